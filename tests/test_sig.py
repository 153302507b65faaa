import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from backdoor import SIG, TrainRecipe, eval_sets, evaluate, train_backdoored
from backdoor.attacks import AttackError, make_attack
from orchestrator.spec import expand, load_grid



def images(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def labelled(counts: list[int]) -> torch.Tensor:
    """Shuffled labels with counts[c] samples of class c."""
    y = torch.cat([torch.full((count,), c) for c, count in enumerate(counts)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("shape, params, delta, frequency", [
    ((3, 4, 32), {}, 40.0, 6),
    ((1, 5, 10), {"delta": 100, "frequency": 3}, 100.0, 3),
    ((2, 3, 7), {"delta": 20.5, "frequency": 1}, 20.5, 1),
])
def test_pattern_and_pixels_match_the_sinusoid(shape, params, delta, frequency):
    attack = make_attack("sig", params, shape, 10)
    channels, height, width = shape
    wave = delta * np.sin(2 * np.pi * np.arange(width) * frequency / width)
    pattern = attack.state_dict()["pattern"]
    assert pattern.dtype == torch.float32 and tuple(pattern.shape) == shape
    np.testing.assert_allclose(pattern.numpy(), np.broadcast_to(wave, shape), atol=1e-4)

    x = images(20, shape)
    x[0], x[1] = 0, 255  # all-black and all-white images must clip at both ends
    expected = np.clip(np.round(x.numpy().astype(np.float64) + wave), 0, 255).astype(np.uint8)
    out = attack.apply(x)
    assert out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), expected)
    assert (out[0] == 0).any() and (out[1] == 255).any()  # clipped, not wrapped
    assert (out[0] > 0).any() and (out[1] < 255).any()
    assert (out != x).any()


def test_only_target_class_images_are_poisoned_and_labels_kept():
    shape = (3, 6, 9)
    attack = make_attack("sig", {"target": 3, "poison_ratio": 0.05}, shape, 10)
    x, y = images(200, shape), labelled([20] * 10)
    px, py, index = attack.poison_train(x, y, seed=1)
    assert len(index) == 10 and len(set(index.tolist())) == 10  # round(0.05 * 200) of the 20 class-3 images
    assert (y[index] == 3).all()
    assert torch.equal(py, y)
    assert torch.equal(px[index], attack.apply(x[index])) and (px[index] != x[index]).any()
    rest = torch.ones(200, dtype=torch.bool)
    rest[index] = False
    assert torch.equal(px[rest], x[rest])
    assert torch.equal(x, images(200, shape)) and torch.equal(y, labelled([20] * 10))  # inputs untouched


def test_poison_indices_are_seeded():
    attack = make_attack("sig", {"target": 3, "poison_ratio": 0.05}, (1, 4, 5), 10)
    x, y = images(200, (1, 4, 5)), labelled([20] * 10)
    first = attack.poison_train(x, y, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, attack.poison_train(x, y, seed=1)))
    assert not torch.equal(attack.poison_train(x, y, seed=2)[2], first[2])
    every = make_attack("sig", {"target": 3, "poison_ratio": 0.1}, (1, 4, 5), 10).poison_train(x, y, seed=1)[2]
    assert every.tolist() == (y == 3).nonzero().flatten().tolist()


@pytest.mark.parametrize("counts, ratio, message", [
    ([508] + [509] * 8 + [506], 0.2, "attack sig: poison_ratio: 0.2 asks for 1017 images of class 0, which has 508; "
                                     "the largest possible ratio is 0.0999"),
    # 0.1 · 5085 = 508.5, which round() takes to the even 508
    ([508] + [509] * 8 + [505], 0.2, "attack sig: poison_ratio: 0.2 asks for 1017 images of class 0, which has 508; "
                                     "the largest possible ratio is 0.1"),
    ([5] + [10] * 9, 0.5, "attack sig: poison_ratio: 0.5 asks for 48 images of class 0, which has 5; "
                          "the largest possible ratio is 0.05"),
    ([0] + [30] * 9, 0.1, "attack sig: poison_ratio: 0.1 asks for 27 images of class 0, which has 0; "
                          "the largest possible ratio is 0.001"),
])
def test_impossible_ratio_names_the_largest_possible_one(counts, ratio, message):
    n, shape = sum(counts), (1, 2, 5)
    x, y = torch.zeros((n, *shape), dtype=torch.uint8), labelled(counts)
    with pytest.raises(AttackError) as info:
        make_attack("sig", {"poison_ratio": ratio}, shape, 10).poison_train(x, y, seed=0)
    assert str(info.value) == message
    largest = float(re.search(r"ratio is (\S+)$", message).group(1))
    decimals = len(str(n))
    assert round(largest * n) <= counts[0] < round((largest + 10 ** -decimals) * n)
    index = make_attack("sig", {"poison_ratio": largest}, shape, 10).poison_train(x, y, seed=0)[2]
    assert len(index) == round(largest * n) and (y[index] == 0).all()


def test_state_round_trip():
    shape = (3, 8, 10)
    source = make_attack("sig", {"delta": 25, "frequency": 3}, shape, 10)
    restored = make_attack("sig", {}, shape, 10, state=source.state_dict())
    assert isinstance(restored, SIG)
    assert torch.equal(restored.state_dict()["pattern"], source.state_dict()["pattern"])
    x = images(8, shape)
    assert torch.equal(restored.apply(x), source.apply(x))
    assert not torch.equal(make_attack("sig", {}, shape, 10).apply(x), source.apply(x))
    with pytest.raises(AttackError, match="attack sig: state.pattern:"):
        make_attack("sig", {}, shape, 10, state={"pattern": source.state_dict()["pattern"].to(torch.uint8)})
    with pytest.raises(AttackError, match="attack sig: state:"):
        make_attack("sig", {}, shape, 10, state={})


def test_grid_accepts_sig(write_grid):
    grid = load_grid(write_grid(name="sig", attacks=[{"name": "sig"}, {"name": "sig", "delta": 30, "frequency": 3}]))
    attacks = [trial.attack for trial in expand(grid)]
    assert [a.name for a in attacks] == ["sig", "sig"]
    assert attacks[0].params == {"target": 0, "poison_ratio": 0.1, "label_mode": "all2one", "delta": 40.0,
                                 "frequency": 6}
    assert attacks[1].params["delta"] == 30.0 and attacks[1].params["frequency"] == 3


def test_training_implants_a_working_backdoor(cifar_slice):
    # On 8x8 digits class 0 is too easy to tell apart for the signal to matter (ASR stays near 0 with the
    # default delta), so this uses a slice of the CIFAR-10 subset, the setting SIG was designed for.
    data = cifar_slice
    attack = make_attack("sig", {}, data.shape, data.num_classes)
    model = train_backdoored(data, attack, "cnn-small", TrainRecipe(epochs=5, lr=0.05, batch_size=64), seed=0)
    sets = eval_sets(data, attack)
    metrics = evaluate(model, sets)
    # Without the trigger the same images are rarely called class 0: the signal, not a bias, does it.
    plain = evaluate(model, replace(sets, x_bd=data.x_test[data.y_test != 0]))
    assert metrics.asr > 0.7 and plain.asr < 0.1
    assert metrics.acc > 0.2  # chance is 0.1
