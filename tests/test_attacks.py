import pytest
import torch

from backdoor.attacks import ATTACKS, AttackError, BadNets, Blended, make_attack

SHAPE = (3, 8, 8)


def images(n: int, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("position, rows, cols", [
    ("bottom-right", slice(5, 8), slice(5, 8)),
    ("bottom-left", slice(5, 8), slice(0, 3)),
    ("top-right", slice(0, 3), slice(5, 8)),
    ("top-left", slice(0, 3), slice(0, 3)),
])
def test_badnets_white_patch_positions(position, rows, cols):
    attack = make_attack("badnets", {"position": position}, SHAPE, 10)
    x = images(4)
    out = attack.apply(x)
    assert out.dtype == torch.uint8
    assert (out[:, :, rows, cols] == 255).all()  # every channel
    outside = torch.ones(SHAPE, dtype=torch.bool)
    outside[:, rows, cols] = False
    assert torch.equal(out[:, outside], x[:, outside])


def test_badnets_checkerboard_starts_white_at_patch_corner():
    attack = make_attack("badnets", {"pattern": "checkerboard", "patch_size": 3}, (1, 6, 6), 10)
    out = attack.apply(torch.full((1, 1, 6, 6), 7, dtype=torch.uint8))
    expected = torch.full((6, 6), 7, dtype=torch.uint8)
    expected[3:, 3:] = torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert torch.equal(out[0, 0], expected)
    top_left = make_attack("badnets", {"pattern": "checkerboard", "patch_size": 2, "position": "top-left"},
                           (1, 6, 6), 10).apply(torch.full((1, 1, 6, 6), 7, dtype=torch.uint8))
    assert top_left[0, 0, :2, :2].tolist() == [[255, 0], [0, 255]] and top_left[0, 0, 2, 2] == 7


def test_blended_formula_and_seeded_pattern():
    attack = make_attack("blended", {"alpha": 0.2, "pattern_seed": 5}, SHAPE, 10)
    pattern = torch.randint(0, 256, SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    assert torch.equal(attack.state_dict()["pattern"], pattern)
    x = images(16)
    expected = torch.round(0.8 * x.double() + 0.2 * pattern.double()).to(torch.uint8)
    assert torch.equal(attack.apply(x), expected)
    assert torch.equal(make_attack("blended", {"alpha": 1}, SHAPE, 10).apply(x)[3],
                       make_attack("blended", {}, SHAPE, 10).state_dict()["pattern"])
    other = make_attack("blended", {"pattern_seed": 6}, SHAPE, 10)
    assert not torch.equal(other.state_dict()["pattern"], pattern)


# An imported attack cannot poison; clean-label SIG, the in-batch attacks and those whose trigger needs a clean
# model or trained networks have their own test files.
@pytest.mark.parametrize("name", sorted(name for name, cls in ATTACKS.items()
                                        if not (cls.needs_model or cls.learns_trigger or cls.in_batch)
                                        and name not in {"imported", "sig"}))
def test_poison_train_count_labels_and_determinism(name):
    attack = make_attack(name, {"target": 2, "poison_ratio": 0.15}, SHAPE, 10)
    x, y = images(100), torch.arange(100) % 10
    px, py, index = attack.poison_train(x, y, seed=1)
    assert len(index) == 15 and len(set(index.tolist())) == 15
    assert (py[index] == 2).all()
    rest = torch.ones(100, dtype=torch.bool)
    rest[index] = False
    assert torch.equal(py[rest], y[rest]) and torch.equal(px[rest], x[rest])
    assert torch.equal(px[index], attack.apply(x[index]))
    again = attack.poison_train(x, y, seed=1)
    assert all(torch.equal(a, b) for a, b in zip((px, py, index), again))
    assert not torch.equal(attack.poison_train(x, y, seed=2)[2], index)
    assert torch.equal(x, images(100)) and torch.equal(y, torch.arange(100) % 10)  # inputs untouched


def test_poison_indices_include_target_class_samples():
    # BackdoorBench samples from all classes: with a ratio of 1 every target-class image is poisoned too.
    attack = make_attack("badnets", {"poison_ratio": 1.0}, SHAPE, 10)
    _, _, index = attack.poison_train(images(20), torch.zeros(20, dtype=torch.int64), seed=0)
    assert index.tolist() == list(range(20))
    none = make_attack("badnets", {"poison_ratio": 0.0}, SHAPE, 10)
    assert len(none.poison_train(images(20), torch.zeros(20, dtype=torch.int64), seed=0)[2]) == 0


def test_all2all_labels():
    attack = make_attack("badnets", {"label_mode": "all2all"}, SHAPE, 4)
    assert attack.backdoor_labels(torch.tensor([0, 1, 2, 3])).tolist() == [1, 2, 3, 0]
    all2one = make_attack("blended", {"target": 3}, SHAPE, 4)
    assert all2one.backdoor_labels(torch.tensor([0, 1, 2, 3])).tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("name, params, message", [
    ("badnets", {"patch_size": 9}, "attack badnets: patch_size: must be between 1 and 8 (image is 8x8)"),
    ("badnets", {"patch_size": 0}, "attack badnets: patch_size: must be between 1 and 8 (image is 8x8)"),
    ("badnets", {"position": "middle"}, "attack badnets: position:"),
    ("badnets", {"pattern": "stripes"}, "attack badnets: pattern:"),
    ("badnets", {"poison_ratio": 1.5}, "attack badnets: poison_ratio: must be in [0, 1]"),
    ("badnets", {"target": 10}, "attack badnets: target:"),
    ("badnets", {"label_mode": "all2some"}, "attack badnets: label_mode:"),
    ("badnets", {"size": 3}, "attack badnets: size: unknown parameter"),
    ("badnets", {"patch_size": 2.5}, "attack badnets: patch_size: expected int"),
    ("blended", {"alpha": 0}, "attack blended: alpha: must be in (0, 1]"),
    ("blended", {"alpha": 1.2}, "attack blended: alpha: must be in (0, 1]"),
    ("blended", {"poison_ratio": "0.1"}, "attack blended: poison_ratio: expected float"),
    ("blended", {"target": True}, "attack blended: target: expected int"),
    ("bpp", {}, "attack bpp: name: unknown attack"),
    ("sig", {"label_mode": "all2all"}, "attack sig: label_mode: must be all2one: SIG is clean-label"),
    ("sig", {"delta": 0}, "attack sig: delta: must be in (0, 255]"),
    ("sig", {"delta": 256}, "attack sig: delta: must be in (0, 255]"),
    ("sig", {"frequency": 0}, "attack sig: frequency: must be >= 1"),
    ("sig", {"frequency": 4}, "attack sig: frequency: must not be a multiple of 8/2 (image width 8)"),
    ("sig", {"frequency": 2.5}, "attack sig: frequency: expected int"),
    ("sig", {"poison_ratio": 1.5}, "attack sig: poison_ratio: must be in [0, 1]"),
    ("lf", {"label_mode": "all2all"}, "attack lf: label_mode: must be all2one"),
    ("lf", {"clean_epochs": 0}, "attack lf: clean_epochs: must be >= 1"),
    ("lf", {"passes": 0}, "attack lf: passes: must be >= 1"),
    ("lf", {"images": 0}, "attack lf: images: must be >= 1"),
    ("lf", {"steps": 0}, "attack lf: steps: must be >= 1"),
    ("lf", {"sigma": 0.0}, "attack lf: sigma: must be > 0"),
    ("lf", {"max_value": 1.5}, "attack lf: max_value: must be in (0, 1]"),
    ("lf", {"images": 2.5}, "attack lf: images: expected int"),
    ("trojan", {"clean_epochs": 0}, "attack trojan: clean_epochs: must be >= 1"),
    ("trojan", {"neurons": 0}, "attack trojan: neurons: must be >= 1"),
    ("trojan", {"steps": 0}, "attack trojan: steps: must be >= 1"),
    ("trojan", {"step_size": 0.0}, "attack trojan: step_size: must be > 0"),
    ("ssba", {"bits": 0}, "attack ssba: bits: must be >= 1"),
    ("ssba", {"width": 0}, "attack ssba: width: must be >= 1"),
    ("ssba", {"encoder_epochs": 0}, "attack ssba: encoder_epochs: must be >= 1"),
    ("ssba", {"max_residual": 0.0}, "attack ssba: max_residual: must be in (0, 1]"),
    ("ssba", {"encoder_lr": -1.0}, "attack ssba: encoder_lr: must be > 0"),
    ("inputaware", {"mask_density": 1.0}, "attack inputaware: mask_density: must be in (0, 1)"),
    ("inputaware", {"mask_epochs": 0}, "attack inputaware: mask_epochs: must be >= 1"),
    ("inputaware", {"lambda_div": -1.0}, "attack inputaware: lambda_div: must be >= 0"),
    ("inputaware", {"generator_lr": 0.0}, "attack inputaware: generator_lr: must be > 0"),
    ("inputaware", {"poison_ratio": 0.6}, "attack inputaware: cross_ratio: (1 + cross_ratio)·poison_ratio must be"),
])
def test_invalid_parameters(name, params, message):
    with pytest.raises(AttackError) as info:
        make_attack(name, params, SHAPE, 10)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_integer_ratio_is_accepted_as_float():
    assert make_attack("blended", {"poison_ratio": 1, "alpha": 1}, SHAPE, 10).params.poison_ratio == 1.0


def test_state_restores_trigger_and_is_validated():
    source = make_attack("badnets", {"pattern": "checkerboard", "position": "top-left"}, SHAPE, 10)
    restored = make_attack("badnets", {}, SHAPE, 10, state=source.state_dict())
    assert isinstance(restored, BadNets)
    x = images(5)
    assert torch.equal(restored.apply(x), source.apply(x))
    blend = make_attack("blended", {"pattern_seed": 3}, SHAPE, 10)
    assert isinstance(blend, Blended)
    assert torch.equal(make_attack("blended", {}, SHAPE, 10, state=blend.state_dict()).apply(x), blend.apply(x))
    with pytest.raises(AttackError, match="attack badnets: state:"):
        make_attack("badnets", {}, SHAPE, 10, state={"mask": source.state_dict()["mask"]})
    with pytest.raises(AttackError, match="attack blended: state.pattern:"):
        make_attack("blended", {}, SHAPE, 10, state={"pattern": torch.zeros(1, 8, 8, dtype=torch.uint8)})
    with pytest.raises(AttackError, match="attack blended: state.pattern:"):
        make_attack("blended", {}, SHAPE, 10, state={"pattern": torch.zeros(SHAPE)})
