"""Architectures. Every model is Sequential(Normalize(mean, std), net) and takes images in [0, 1]."""

import torch
import torch.nn.functional as F
from torch import nn

ARCHS: tuple[str, ...] = ("cnn-small", "preactresnet18", "vgg19_bn", "efficientnet_b3", "mobilenet_v3_large",
                          "densenet161")


class ModelError(ValueError):
    """An architecture that cannot be built; the message names the field and the reason."""


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PoolWhileLarge(nn.Module):
    """2×2 max-pooling while the map is larger than 3×3, so that one network serves images from 8×8 to 64×64."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2) if min(x.shape[-2:]) > 3 else x


def cnn_small(channels: int, num_classes: int) -> nn.Sequential:
    """Conv-BN-ReLU stages of 32, 64, 128+128 and 128 channels with pooling between them, global average pooling
    and a linear layer: fast on CPU, and its receptive field (46 px) covers a 28×28 or 32×32 image."""
    def conv(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*conv(channels, 32), PoolWhileLarge(), *conv(32, 64), PoolWhileLarge(),
                         *conv(64, 128), *conv(128, 128), PoolWhileLarge(), *conv(128, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            # A one-layer Sequential keeps BackdoorBench's key name "shortcut.0.weight".
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet18(nn.Module):
    """BackdoorBench's CIFAR PreAct-ResNet18 (same parameter names, so its weights load as they are)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 3, padding=1, bias=False)
        widths, in_planes = (64, 128, 256, 512), 64
        for i, planes in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            self.add_module(f"layer{i}", nn.Sequential(PreActBlock(in_planes, planes, stride),
                                                       PreActBlock(planes, planes, 1)))
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.avgpool(out).flatten(1))


def torchvision_net(arch: str, channels: int, num_classes: int) -> nn.Module:
    """A torchvision model as BackdoorBench builds it: the plain constructor, random init, ImageNet stem.

    Its adaptive pooling is what lets 32×32 inputs through (they reach the last stage as 1×1 maps), so inputs
    must be 32×32 or larger. For channels != 3 only the first conv is replaced, by one of the same shape that
    takes `channels` inputs (PyTorch's default init).
    """
    from torchvision import models

    net = getattr(models, arch)(weights=None, num_classes=num_classes)
    if channels != 3:
        name, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
        net.set_submodule(name, nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride,
                                          conv.padding, bias=conv.bias is not None))
    return net


def build_model(arch: str, num_classes: int, channels: int, mean, std) -> nn.Sequential:
    if arch not in ARCHS:
        raise ModelError(f"arch: unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
    if num_classes < 2:
        raise ModelError(f"num_classes: must be >= 2, got {num_classes}")
    if channels < 1 or not len(mean) == len(std) == channels or min(std) <= 0:
        raise ModelError(f"mean/std: need {channels} values each with std > 0, got {mean} / {std}")
    if arch == "cnn-small":
        net = cnn_small(channels, num_classes)
    elif arch == "preactresnet18":
        net = PreActResNet18(channels, num_classes)
    else:
        net = torchvision_net(arch, channels, num_classes)
    return nn.Sequential(Normalize(mean, std), net)


def check_fits(arch: str, shape: tuple[int, int, int], num_classes: int) -> None:
    """Raise ModelError unless `arch` takes C×H×W images (VGG and DenseNet, for one, need 32×32 or more)."""
    channels = shape[0]
    model = build_model(arch, num_classes, channels, (0.0,) * channels, (1.0,) * channels).eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    except RuntimeError as error:
        reason = str(error).splitlines()[0]
        raise ModelError(f"arch: {arch} cannot take {shape[1]}x{shape[2]} images ({reason})") from None
