from dataclasses import replace

import numpy as np
import pytest
import torch

from backdoor import TrainRecipe, Trojan, eval_sets, evaluate, train_backdoored, train_clean
from backdoor.attacks import AttackError, make_attack
from backdoor.record import ModelRecord, load_record, save_record

RECIPE = TrainRecipe(epochs=2, lr=0.05, batch_size=64)
FAST = {"clean_epochs": 2, "steps": 20}


def prepared(data, model, **params) -> Trojan:
    attack = make_attack("trojan", FAST | params, data.shape, data.num_classes)
    attack.prepare(model, data, 0)
    return attack


def test_square_mask_in_the_bottom_right_quadrant():
    mask = make_attack("trojan", {}, (3, 32, 32), 10).square()
    rows, cols = mask[0].nonzero().unbind(1)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (17, 27, 17, 27)  # 11×11, ends 4 px from the edges
    assert torch.equal(mask[1], mask[0]) and torch.equal(mask[2], mask[0])
    small = make_attack("trojan", {}, (1, 8, 8), 10).square()[0]
    assert small[4:7, 4:7].all() and small.sum() == 9  # 3×3, one pixel from the bottom and right edges


@pytest.fixture(scope="module")
def responsive_model(digits):
    """cnn-small trained 4 epochs on clean digits. After 2 its two strongest last-layer inputs are still zero on a
    patch alone, where no pattern can move a ReLU that does not fire; after 4 they respond."""
    return train_clean(digits, "cnn-small", TrainRecipe(epochs=4, lr=0.05, batch_size=64), seed=0)


def test_trigger_is_seeded_masked_and_excites_the_chosen_neurons(digits, responsive_model):
    clean_model = responsive_model
    attack = prepared(digits, clean_model)
    mask, pattern = attack.state_dict()["mask"], attack.state_dict()["pattern"]
    assert mask.dtype == torch.bool and pattern.dtype == torch.uint8 and tuple(pattern.shape) == digits.shape
    assert torch.equal(mask, attack.square()) and (pattern[~mask] == 0).all() and (pattern[mask] > 0).any()
    assert torch.equal(prepared(digits, clean_model).state_dict()["pattern"], pattern)
    assert not torch.equal(prepared(digits, clean_model, trigger_seed=1).state_dict()["pattern"], pattern)

    # The optimised pattern drives the two strongest neurons higher than its random start does.
    layer = clean_model[1][-1]
    chosen = layer.weight.abs().sum(0).topk(2).indices
    features = torch.nn.Sequential(clean_model[0], clean_model[1][:-1])  # up to the last linear layer
    start = torch.rand(digits.shape, generator=torch.Generator().manual_seed(0)) * mask
    with torch.no_grad():
        optimised = features(pattern[None].float() / 255)[0, chosen]
        random = features(start[None])[0, chosen]
    # Never lower; higher wherever the neuron fires at all (no pattern moves a ReLU that does not).
    assert (optimised >= random).all() and ((optimised > random) | (optimised == 0)).all()


def test_apply_adds_the_masked_pattern_and_clips_instead_of_wrapping():
    shape = (3, 6, 6)
    attack = make_attack("trojan", {}, shape, 10)
    mask = attack.square()
    pattern = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8) * mask
    attack = make_attack("trojan", {}, shape, 10, state={"mask": mask, "pattern": pattern})
    x = torch.randint(0, 256, (10, *shape), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    expected = np.clip(x.numpy().astype(np.int64) + pattern.numpy(), 0, 255).astype(np.uint8)
    out = attack.apply(x)
    np.testing.assert_array_equal(out.numpy(), expected)
    assert torch.equal(out[:, ~mask], x[:, ~mask]) and (out[:, mask] == 255).any()


def test_record_round_trip_and_all2all(digits, clean_model, tmp_path):
    params = FAST | {"label_mode": "all2all"}  # the trigger excites neurons, not a class: all2all makes sense
    attack = make_attack("trojan", params, digits.shape, 10)
    model = train_backdoored(digits, attack, "cnn-small", RECIPE, seed=0)
    assert torch.equal(attack.state_dict()["pattern"], prepared(digits, clean_model).state_dict()["pattern"])
    record = ModelRecord(arch="cnn-small", num_classes=10, shape=digits.shape, mean=digits.mean, std=digits.std,
                         dataset="digits", attack="trojan", attack_params=params, seed=0, recipe={}, metrics={})
    save_record(tmp_path / "rec", model, attack, record)
    _, loaded, _ = load_record(tmp_path / "rec")
    assert isinstance(loaded, Trojan)
    for key in ("mask", "pattern"):
        assert torch.equal(loaded.state_dict()[key], attack.state_dict()[key])
    assert torch.equal(loaded.test_set(digits.x_test, digits.y_test)[1], (digits.y_test + 1) % 10)


def test_unprepared_attack_refuses_to_apply():
    with pytest.raises(AttackError, match=r"^attack trojan: state: not prepared"):
        make_attack("trojan", {}, (1, 8, 8), 10).apply(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_too_many_neurons(digits, clean_model):
    with pytest.raises(AttackError, match=r"^attack trojan: neurons: must be <= the 128 inputs of the last linear"):
        make_attack("trojan", {"neurons": 129}, digits.shape, 10).prepare(clean_model, digits, 0)


def test_training_implants_a_working_backdoor(cifar_slice):
    data = cifar_slice
    attack = make_attack("trojan", {"clean_epochs": 3, "steps": 50}, data.shape, data.num_classes)
    model = train_backdoored(data, attack, "cnn-small", TrainRecipe(epochs=5, lr=0.05, batch_size=64), seed=0)
    sets = eval_sets(data, attack)
    metrics = evaluate(model, sets)
    plain = evaluate(model, replace(sets, x_bd=data.x_test[data.y_test != 0]))  # the same images, no trigger
    assert metrics.asr > plain.asr + 0.3
    assert metrics.acc > 0.2  # chance is 0.1
