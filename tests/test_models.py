import math
from dataclasses import replace

import pytest
import torch
import torchvision
from torch import nn

from backdoor.attacks import make_attack
from backdoor.data import ImageData, load_dataset
from backdoor.metrics import eval_sets, evaluate
from backdoor.models import ARCHS, ModelError, Normalize, build_model
from backdoor.train import RecipeError, TrainRecipe, augment, train_backdoored


SMALL_INPUT_ARCHS = ("cnn-small", "preactresnet18")
TORCHVISION_ARCHS = tuple(arch for arch in ARCHS if arch not in SMALL_INPUT_ARCHS)


def test_archs_are_the_benchmark_models():
    assert set(ARCHS) == {*SMALL_INPUT_ARCHS, "vgg19_bn", "efficientnet_b3", "mobilenet_v3_large", "densenet161"}


@pytest.mark.parametrize("arch", SMALL_INPUT_ARCHS)
@pytest.mark.parametrize("channels, size", [(1, 8), (1, 28), (3, 32), (3, 8)])
def test_output_shapes(arch, channels, size):
    model = build_model(arch, 7, channels, (0.5,) * channels, (0.25,) * channels).eval()
    assert isinstance(model, nn.Sequential) and isinstance(model[0], Normalize)
    with torch.no_grad():
        assert model(torch.rand(2, channels, size, size)).shape == (2, 7)


def torchvision_reference(arch: str, num_classes: int) -> nn.Module:
    # Built on the meta device: shapes only, no memory or init time.
    with torch.device("meta"):
        return getattr(torchvision.models, arch)(num_classes=num_classes)


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_torchvision_archs_as_backdoorbench_builds_them(arch):
    model = build_model(arch, 10, 3, (0.5,) * 3, (0.25,) * 3).eval()
    assert isinstance(model[0], Normalize) and type(model[1]) is type(torchvision_reference(arch, 10))
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in torchvision_reference(arch, 10).parameters())
    with torch.no_grad():
        for size in (32, 64):
            assert model(torch.rand(2, 3, size, size)).shape == (2, 10)


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_torchvision_archs_take_one_channel(arch):
    model = build_model(arch, 43, 1, (0.5,), (0.25,)).eval()
    ours, reference = model[1].state_dict(), torchvision_reference(arch, 43).state_dict()
    first = next(name for name, module in model[1].named_modules() if isinstance(module, nn.Conv2d)) + ".weight"
    assert ours.keys() == reference.keys()
    assert ours[first].shape == (reference[first].shape[0], 1, *reference[first].shape[2:])
    assert all(ours[key].shape == reference[key].shape for key in ours if key != first)
    with torch.no_grad():
        assert model(torch.rand(2, 1, 32, 32)).shape == (2, 43)


def test_preactresnet18_matches_backdoorbench():
    model = build_model("preactresnet18", 10, 3, (0.5,) * 3, (0.5,) * 3)
    assert sum(p.numel() for p in model.parameters()) == 11_171_146
    names = set(model[1].state_dict())
    for key in ("conv1.weight", "layer1.0.bn1.running_mean", "layer2.0.shortcut.0.weight",
                "layer4.1.conv2.weight", "linear.weight", "linear.bias"):
        assert key in names
    assert not any(key.startswith("bn.") for key in names)  # BackdoorBench's net has no final BN


def test_cnn_small_has_batchnorm():
    model = build_model("cnn-small", 10, 1, (0.5,), (0.5,))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(convs) > 0


@pytest.mark.parametrize("size", [8, 28, 32, 64])
def test_cnn_small_pools_down_to_a_few_pixels(size):
    """Whatever the image size, the last convolution sees a map of at most 8×8, so it is not spent at full
    resolution, and its input is at least 2×2 wide, so pooling never empties a map."""
    model = build_model("cnn-small", 10, 3, (0.5,) * 3, (0.5,) * 3).eval()
    last = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    seen = []
    last.register_forward_hook(lambda module, inputs, output: seen.append(output.shape[-2:]))
    with torch.no_grad():
        assert model(torch.rand(2, 3, size, size)).shape == (2, 10)
    assert 2 <= seen[0][0] <= 8 and 2 <= seen[0][1] <= 8


def test_normalize_is_per_channel():
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    assert norm.mean.shape == (1, 3, 1, 1) and set(dict(norm.named_buffers())) == {"mean", "std"}
    out = norm(torch.ones(1, 3, 2, 2))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.0, 3.0, 0.5]))


@pytest.mark.parametrize("args, field", [
    (("resnet50", 10, 3, (0.5,) * 3, (0.5,) * 3), "arch"),
    (("cnn-small", 1, 3, (0.5,) * 3, (0.5,) * 3), "num_classes"),
    (("cnn-small", 10, 3, (0.5,), (0.5,)), "mean/std"),
    (("cnn-small", 10, 1, (0.5,), (0.0,)), "mean/std"),
])
def test_build_model_errors(args, field):
    with pytest.raises(ModelError, match=field):
        build_model(*args)


def test_recipe_validation():
    assert TrainRecipe().epochs == 100 and TrainRecipe(lr=1).lr == 1
    for bad, field in (({"epochs": 0}, "epochs"), ({"batch_size": 2.0}, "batch_size"), ({"lr": 0}, "lr"),
                       ({"momentum": -1}, "momentum"), ({"augment": 1}, "augment")):
        with pytest.raises(RecipeError, match=f"training.{field}:"):
            TrainRecipe(**bad)


def test_augment_crops_and_flips_only_when_asked():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8).to(torch.uint8)
    x = x.repeat(50, 1, 1, 1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    crops = [padded[:, :, t:t + 8, s:s + 8] for t in range(3) for s in range(3)]

    def matches(out, candidates):
        return torch.stack([(out == c).flatten(1).all(1) for c in candidates]).any(0)

    plain = augment(x, torch.Generator().manual_seed(0), flip=False)
    assert matches(plain, crops).all()
    flipped = augment(x, torch.Generator().manual_seed(0), flip=True)
    mirrored = matches(flipped, [c.flip(3) for c in crops]) & ~matches(flipped, crops)
    assert matches(flipped, crops + [c.flip(3) for c in crops]).all() and 0 < mirrored.sum() < len(x)
    assert torch.equal(plain, augment(x, torch.Generator().manual_seed(0), flip=False))


def small_digits(n_train: int) -> ImageData:
    data = load_dataset("digits")
    return replace(data, x_train=data.x_train[:n_train], y_train=data.y_train[:n_train])


def test_training_is_deterministic_per_seed():
    data = small_digits(256)
    attack = make_attack("badnets", {}, data.shape, data.num_classes)
    recipe = TrainRecipe(epochs=2, lr=0.05, batch_size=64)
    losses = []
    first = train_backdoored(data, attack, "cnn-small", recipe, seed=0, on_epoch=lambda e, l: losses.append((e, l)))
    second = train_backdoored(data, attack, "cnn-small", recipe, seed=0)
    third = train_backdoored(data, attack, "cnn-small", recipe, seed=1)
    assert not first.training
    assert [e for e, _ in losses] == [1, 2] and all(math.isfinite(loss) for _, loss in losses)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.state_dict()["1.0.weight"], third.state_dict()["1.0.weight"])


def test_training_implants_a_working_backdoor():
    data = load_dataset("digits")
    attack = make_attack("badnets", {}, data.shape, data.num_classes)
    model = train_backdoored(data, attack, "cnn-small", TrainRecipe(epochs=6, lr=0.05, batch_size=64), seed=0)
    metrics = evaluate(model, eval_sets(data, attack))
    assert metrics.acc > 0.9 and metrics.asr > 0.9 and metrics.ra < 0.1
