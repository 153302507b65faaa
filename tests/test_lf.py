from dataclasses import replace

import numpy as np
import pytest
import torch

from backdoor import LF, TrainRecipe, eval_sets, evaluate, train_backdoored
from backdoor.attacks import AttackError, make_attack
from backdoor.models import build_model
from backdoor.record import ModelRecord, RecordError, load_record, save_record

RECIPE = TrainRecipe(epochs=2, lr=0.05, batch_size=64)
FAST = {"clean_epochs": 2, "images": 20, "passes": 2}


def prepared(data, model, seed: int = 0, **params) -> LF:
    attack = make_attack("lf", FAST | params, data.shape, data.num_classes)
    attack.prepare(model, data, seed)
    return attack


def roughness(v: torch.Tensor) -> float:
    """Mean squared difference of neighbouring pixels over the variance: about 2 for white noise, ~0 if smooth."""
    dx, dy = v[:, :, 1:] - v[:, :, :-1], v[:, 1:, :] - v[:, :-1, :]
    return float((dx.square().mean() + dy.square().mean()) / 2 / v.var())


def test_pattern_is_seeded_bounded_and_smooth(digits, clean_model):
    pattern = prepared(digits, clean_model).state_dict()["pattern"]
    assert pattern.dtype == torch.float32 and tuple(pattern.shape) == digits.shape
    assert pattern.min().item() == 0 and pattern.max().item() == pytest.approx(0.2)
    assert torch.equal(prepared(digits, clean_model).state_dict()["pattern"], pattern)
    assert not torch.equal(prepared(digits, clean_model, seed=1).state_dict()["pattern"], pattern)
    small = prepared(digits, clean_model, max_value=0.05).state_dict()["pattern"]
    assert small.max().item() == pytest.approx(0.05)
    noise = torch.rand(digits.shape, generator=torch.Generator().manual_seed(0))
    assert roughness(noise) > 1.5 and roughness(pattern) < 0.5


def test_apply_adds_the_scaled_pattern_and_clips():
    shape = (3, 5, 6)
    pattern = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 0.2
    attack = make_attack("lf", {}, shape, 10, state={"pattern": pattern})
    x = torch.randint(0, 256, (10, *shape), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    x[0] = 255
    expected = np.clip(np.round(x.numpy() + 255 * pattern.numpy().astype(np.float64)), 0, 255).astype(np.uint8)
    out = attack.apply(x)
    assert out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), expected)
    assert (out[0] == 255).all() and (out != x).any()
    px, py, index = attack.poison_train(x, torch.arange(10), seed=0)  # dirty-label, any class, as BadNets
    assert len(index) == 1 and py[index].tolist() == [0] and torch.equal(px[index], out[index])


def test_training_prepares_the_trigger_from_a_clean_model(digits, clean_model, tmp_path):
    attack = make_attack("lf", FAST, digits.shape, 10)
    model = train_backdoored(digits, attack, "cnn-small", RECIPE, seed=0)
    # The clean model is trained with the backdoor recipe and seed, for clean_epochs (here as many as RECIPE).
    assert torch.equal(attack.state_dict()["pattern"], prepared(digits, clean_model).state_dict()["pattern"])
    record = ModelRecord(arch="cnn-small", num_classes=10, shape=digits.shape, mean=digits.mean, std=digits.std,
                         dataset="digits", attack="lf", attack_params=FAST, seed=0, recipe={}, metrics={})
    save_record(tmp_path / "rec", model, attack, record)
    _, loaded, _ = load_record(tmp_path / "rec")
    assert isinstance(loaded, LF) and torch.equal(loaded.state_dict()["pattern"], attack.state_dict()["pattern"])
    assert torch.equal(loaded.apply(digits.x_test), attack.apply(digits.x_test))
    # A restored trigger is kept: training again does not recompute it from another clean model.
    train_backdoored(digits, loaded, "cnn-small", replace(RECIPE, epochs=1), seed=5)
    assert torch.equal(loaded.state_dict()["pattern"], attack.state_dict()["pattern"])


def test_unprepared_attack_refuses_to_apply_and_to_be_stored(tmp_path):
    attack = make_attack("lf", {}, (1, 8, 8), 10)
    with pytest.raises(AttackError, match=r"^attack lf: state: not prepared"):
        attack.apply(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    model = build_model("cnn-small", 10, 1, (0.5,), (0.25,))
    record = ModelRecord(arch="cnn-small", num_classes=10, shape=(1, 8, 8), mean=(0.5,), std=(0.25,),
                         dataset="digits", attack="lf", attack_params={}, seed=0, recipe={}, metrics={})
    save_record(tmp_path / "rec", model, attack, record)
    with pytest.raises(RecordError, match=r"attack lf: state: expected tensors \['pattern'\], got \[\]"):
        load_record(tmp_path / "rec")


def test_too_many_images(digits, clean_model):
    attack = make_attack("lf", {"images": 10_000}, digits.shape, 10)
    with pytest.raises(AttackError, match=r"^attack lf: images: must be <= the 1438 training images, got 10000$"):
        attack.prepare(clean_model, digits, 0)


def test_training_implants_a_working_backdoor(cifar_slice):
    data = cifar_slice
    attack = make_attack("lf", {"clean_epochs": 3, "images": 20, "passes": 2}, data.shape, data.num_classes)
    model = train_backdoored(data, attack, "cnn-small", TrainRecipe(epochs=5, lr=0.05, batch_size=64), seed=0)
    sets = eval_sets(data, attack)
    metrics = evaluate(model, sets)
    plain = evaluate(model, replace(sets, x_bd=data.x_test[data.y_test != 0]))  # the same images, no trigger
    assert metrics.asr > plain.asr + 0.2
    assert metrics.acc > 0.2  # chance is 0.1
