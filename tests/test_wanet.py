from dataclasses import replace

import pytest
import torch

from backdoor import TrainRecipe, WaNet, eval_sets, evaluate, train_backdoored
from backdoor.attacks import AttackError, make_attack
from backdoor.data import to_unit
from backdoor.models import build_model
from backdoor.record import ModelRecord, load_record, save_record

SHAPE = (3, 10, 10)  # (10 - 1) / (4 - 1) = 3: the default 4×4 control points land on every third pixel


def images(n: int, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_field_is_seeded_and_normalised_before_upsampling():
    attack = make_attack("wanet", {}, SHAPE, 10)
    assert isinstance(attack, WaNet) and attack.in_batch
    field = attack.state_dict()["field"]
    assert field.dtype == torch.float32 and tuple(field.shape) == (10, 10, 2)
    # Bicubic upsampling with aligned corners passes through the control points, so they show the k×k field.
    control = field[::3, ::3]
    assert tuple(control.shape) == (4, 4, 2)
    assert control.abs().mean().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(make_attack("wanet", {"strength": 2.0}, SHAPE, 10).state_dict()["field"], field)
    assert not torch.equal(make_attack("wanet", {"grid_seed": 1}, SHAPE, 10).state_dict()["field"], field)
    wide = make_attack("wanet", {"grid_k": 2}, (1, 5, 9), 10).state_dict()["field"]
    assert tuple(wide.shape) == (5, 9, 2) and wide[::4, ::8].abs().mean().item() == pytest.approx(1.0, abs=1e-5)


def test_vanishing_strength_is_the_identity():
    x = images(6)
    assert torch.equal(make_attack("wanet", {"strength": 1e-6}, SHAPE, 10).apply(x), x)
    grid = make_attack("wanet", {"strength": 1e-6}, (1, 4, 7), 10).grid(torch.device("cpu"))
    assert torch.allclose(grid[0, :, 0], torch.linspace(-1, 1, 7), atol=1e-5)  # x runs along the width
    assert torch.allclose(grid[:, 0, 1], torch.linspace(-1, 1, 4), atol=1e-5)  # y along the height


def test_apply_warps_slightly_and_stays_uint8():
    shape = (3, 32, 32)
    attack = make_attack("wanet", {}, shape, 10)
    # Smooth images, as natural ones are: a small warp moves each pixel to a nearby, similar value.
    smooth = torch.nn.functional.interpolate(images(8, (3, 4, 4)).float(), size=(32, 32), mode="bilinear")
    x = smooth.round().to(torch.uint8)
    out = attack.apply(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    diff = (out.float() - x.float()).abs()
    assert (diff > 0).float().mean() > 0.3  # most pixels move
    assert diff.mean() < 3  # but stay close (0-255 scale)
    assert torch.equal(attack.apply(x), out)
    stronger = make_attack("wanet", {"strength": 4.0}, shape, 10).apply(x)
    assert (stronger.float() - x.float()).abs().mean() > diff.mean()


@pytest.mark.parametrize("label_mode, expected_bd", [("all2one", [3] * 4), ("all2all", [1, 2, 3, 4])])
def test_poison_batch_parts_labels_and_determinism(label_mode, expected_bd):
    attack = make_attack("wanet", {"target": 3, "label_mode": label_mode}, SHAPE, 10)
    raw, y = images(40), torch.arange(40) % 10
    x = to_unit(raw)
    px, py, extra = attack.poison_batch(x, y, torch.Generator().manual_seed(0))
    assert extra.item() == 0  # WaNet trains nothing of its own
    assert px.shape == x.shape and px.dtype == torch.float32 and py.dtype == torch.int64
    # round(0.1·40) = 4 backdoor samples, round(2·0.1·40) = 8 noise-mode samples, 28 clean ones.
    assert py[:4].tolist() == expected_bd and torch.equal(py[4:], y[4:])
    assert torch.allclose(px[:4], to_unit(attack.apply(raw[:4])), atol=0.5 / 255 + 1e-6)  # apply rounds
    plain_warp = to_unit(attack.apply(raw[4:12]))
    assert ((px[4:12] - plain_warp).abs() > 2 / 255).any(dim=(1, 2, 3)).all()  # each sample has its own noise
    assert ((px[4:12] - x[4:12]).abs() > 2 / 255).any(dim=(1, 2, 3)).all()
    assert torch.equal(px[12:], x[12:])
    assert px.min() >= 0 and px.max() <= 1
    again = attack.poison_batch(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], px) and torch.equal(again[1], py)
    other = attack.poison_batch(x, y, torch.Generator().manual_seed(1))
    assert torch.equal(other[0][:4], px[:4]) and not torch.equal(other[0][4:12], px[4:12])
    assert torch.equal(x, to_unit(raw)) and torch.equal(y, torch.arange(40) % 10)  # inputs untouched


def test_poison_batch_counts_round_and_fit_the_batch():
    attack = make_attack("wanet", {"poison_ratio": 0.5, "cross_ratio": 1.0}, SHAPE, 10)
    x, y = to_unit(images(7)), torch.arange(7) + 1
    px, py, _ = attack.poison_batch(x, y, torch.Generator().manual_seed(0))
    # round(3.5) = 4 backdoor samples leave 3 for noise mode, not round(3.5) = 4.
    assert len(px) == 7 and py.tolist() == [0, 0, 0, 0, 5, 6, 7]
    none = make_attack("wanet", {"poison_ratio": 0.0}, SHAPE, 10)
    assert torch.equal(none.poison_batch(x, y, torch.Generator().manual_seed(0))[0], x)


def test_training_set_is_left_clean():
    attack = make_attack("wanet", {}, SHAPE, 10)
    x, y = images(20), torch.arange(20) % 10
    px, py, index = attack.poison_train(x, y, seed=0)
    assert torch.equal(px, x) and torch.equal(py, y) and len(index) == 0


@pytest.mark.parametrize("params, message", [
    ({"grid_k": 1}, "attack wanet: grid_k: must be between 2 and 8 (image is 8x9)"),
    ({"grid_k": 9}, "attack wanet: grid_k: must be between 2 and 8 (image is 8x9)"),
    ({"strength": 0}, "attack wanet: strength: must be > 0"),
    ({"strength": float("nan")}, "attack wanet: strength: must be a finite number, got nan"),
    ({"cross_ratio": -0.5}, "attack wanet: cross_ratio: must be >= 0"),
    ({"poison_ratio": 0.4, "cross_ratio": 2.0},
     "attack wanet: cross_ratio: (1 + cross_ratio)·poison_ratio must be <= 1, got (1 + 2.0)·0.4"),
    ({"grid_k": 4.0}, "attack wanet: grid_k: expected int"),
    ({"label_mode": "all2some"}, "attack wanet: label_mode:"),
])
def test_invalid_parameters(params, message):
    with pytest.raises(AttackError) as info:
        make_attack("wanet", params, (3, 8, 9), 10)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_state_is_validated():
    field = make_attack("wanet", {}, SHAPE, 10).state_dict()["field"]
    expected = r"attack wanet: state.field: expected torch.float32 tensor of shape \(10, 10, 2\)"
    with pytest.raises(AttackError, match=expected):
        make_attack("wanet", {}, SHAPE, 10, state={"field": field[:, :9]})
    with pytest.raises(AttackError, match="attack wanet: state.field:"):
        make_attack("wanet", {}, SHAPE, 10, state={"field": field.double()})
    with pytest.raises(AttackError, match="attack wanet: state:"):
        make_attack("wanet", {}, SHAPE, 10, state={"pattern": field})


def test_record_round_trip(tmp_path):
    params = {"grid_seed": 7, "strength": 1.5}
    attack = make_attack("wanet", params, SHAPE, 10)
    model = build_model("cnn-small", 10, 3, (0.5,) * 3, (0.25,) * 3)
    record = ModelRecord(arch="cnn-small", num_classes=10, shape=SHAPE, mean=(0.5,) * 3, std=(0.25,) * 3,
                         dataset="npz:x", attack="wanet", attack_params=params, seed=0, recipe={}, metrics={})
    save_record(tmp_path / "rec", model, attack, record)
    _, loaded, loaded_record = load_record(tmp_path / "rec")
    assert isinstance(loaded, WaNet) and loaded_record == record
    assert torch.equal(loaded.state_dict()["field"], attack.state_dict()["field"])
    x, y = images(30), torch.arange(30) % 10
    assert torch.equal(loaded.test_set(x, y)[0], attack.test_set(x, y)[0])
    assert not torch.equal(make_attack("wanet", {**params, "grid_seed": 8}, SHAPE, 10).apply(x), attack.apply(x))


def test_training_implants_a_working_backdoor(cifar_slice):
    # On a 1,000-image CIFAR-10 slice in 5 epochs the default warp (k=4, s=0.5) is not learned: ASR equals the
    # rate at which clean non-target images are called the target, and a differently seeded warp gets the same
    # ASR. A coarse, strong warp (k=2, s=32) is, so that is what this checks; the training hook is the same.
    data = cifar_slice
    params = {"grid_k": 2, "strength": 32.0}
    attack = make_attack("wanet", params, data.shape, data.num_classes)
    model = train_backdoored(data, attack, "cnn-small", TrainRecipe(epochs=5, lr=0.05, batch_size=64), seed=0)
    sets = eval_sets(data, attack)
    metrics = evaluate(model, sets)
    # Baselines: the same images unwarped, and warped through another seed's field.
    plain = evaluate(model, replace(sets, x_bd=data.x_test[data.y_test != 0]))
    other = evaluate(model, eval_sets(data, make_attack("wanet", {**params, "grid_seed": 1}, data.shape, 10)))
    assert metrics.asr > plain.asr + 0.1 and metrics.asr > other.asr + 0.05
    assert metrics.acc > 0.2  # chance is 0.1
