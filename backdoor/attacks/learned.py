"""Attacks whose trigger is a network the project trains on the clean training images: SSBA's encoder, which
hides a fixed code in each image, and InputAware's mask and pattern generators, the second trained jointly with
the classifier."""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageData, to_unit
from .base import Attack, InBatchAttack, InBatchParams, PoisonParams


@dataclass(frozen=True)
class SSBAParams(PoisonParams):
    bits: int = 16  # length of the hidden code
    max_residual: float = 0.03  # bound of the residual per pixel, on the [0, 1] scale (about 8/255)
    width: int = 32  # channels of the encoder and decoder layers
    encoder_epochs: int = 10
    encoder_lr: float = 1e-3
    code_seed: int = 0  # the code every poisoned image carries


@dataclass(frozen=True)
class InputAwareParams(InBatchParams):
    cross_ratio: float = 1.0  # cross samples (another image's pattern and mask, true label) per backdoor sample
    mask_epochs: int = 25  # stage 1: the mask generator alone
    mask_density: float = 0.032  # share of the image the mask may cover before the sparsity loss applies
    lambda_norm: float = 100.0  # weight of the sparsity loss
    lambda_div: float = 1.0  # weight of the diversity loss
    width: int = 32  # channels of the generators' first stage (then twice and four times as many)
    generator_lr: float = 0.01  # Adam, betas (0.5, 0.9), for both generators


def _block(cin: int, cout: int, norm: bool) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), *([nn.BatchNorm2d(cout)] if norm else []), nn.ReLU()]


class EncoderDecoder(nn.Module):
    """Three stages of two conv-BN-ReLU layers (width, 2·width, 4·width channels) each followed by 2×2
    max-pooling, a middle layer, three stages back up (bilinear upsampling to each stage's size), a 1×1 conv."""

    def __init__(self, channels: int, out_channels: int, width: int):
        super().__init__()
        widths = [width, 2 * width, 4 * width]
        self.down, current = nn.ModuleList(), channels
        for w in widths:
            self.down.append(nn.Sequential(*_block(current, w, True), *_block(w, w, True)))
            current = w
        self.middle = nn.Sequential(*_block(current, current, True))
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(nn.Sequential(*_block(current, w, True), *_block(w, w, True)))
            current = w
        self.out = nn.Conv2d(current, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = []
        for stage in self.down:
            x = stage(x)
            sizes.append(x.shape[-2:])
            x = F.max_pool2d(x, 2)
        x = self.middle(x)
        for stage, size in zip(self.up, reversed(sizes)):
            x = stage(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return self.out(x)


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square distance (its gradient kept finite where a and b coincide)."""
    return (a - b).square().flatten(1).mean(1).clamp_min(1e-12).sqrt()


def _texture(x: torch.Tensor) -> torch.Tensor:
    """Local contrast, N×1×H×W: |x − its 3×3 mean| over channels, relative to the image's mean contrast and
    capped at 1, so the residual is full in the busier half of an image and fades out where it is flat."""
    contrast = (x - F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)).abs().mean(1, keepdim=True)
    return (contrast / contrast.flatten(1).mean(1).clamp_min(1e-6)[:, None, None, None]).clamp(max=1)


def _squash(x: torch.Tensor) -> torch.Tensor:
    """(tanh + 1)/2: a generator's output in [0, 1]."""
    return (torch.tanh(x) + 1) / 2


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


class LearnedTrigger(Attack):
    """Base: the state is the weights of the networks `networks()` builds; empty until `learn` trains them."""

    learns_trigger = True
    chunk: ClassVar[int] = 512  # images per forward pass when triggering a whole set

    def networks(self) -> nn.ModuleDict:
        raise NotImplementedError

    def triggered(self, x: torch.Tensor) -> torch.Tensor:
        """Trigger float images in [0, 1] with the networks as they are (no gradient, eval mode)."""
        raise NotImplementedError

    def make_state(self) -> dict[str, torch.Tensor]:
        self.nets = self.networks()
        return {}

    def checked_state(self, state: dict) -> dict[str, torch.Tensor]:
        self.nets = self.networks()
        expected = self.nets.state_dict()
        if set(state) != set(expected):
            self.fail("state", f"expected the tensors of the trigger networks ({len(expected)}), got {len(state)}"
                      + (f" (missing {sorted(set(expected) - set(state))[0]})" if set(expected) - set(state) else ""))
        for key, ref in expected.items():
            tensor = state[key]
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != ref.dtype or tensor.shape != ref.shape:
                self.fail(f"state.{key}", f"expected {ref.dtype} tensor of shape {tuple(ref.shape)}")
        self.nets.load_state_dict(state)
        return self.nets.state_dict()

    def fresh_networks(self, seed: int, device: torch.device) -> None:
        """Networks initialised from `seed`, whatever the global random state."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.nets = self.networks().to(device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The networks' current weights once learned (the pattern generator trains on with the classifier)."""
        if not self.state:
            return {}
        return {key: value.detach().cpu().clone() for key, value in self.nets.state_dict().items()}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if not self.state:
            self.fail("state", "not learned: the trigger networks are trained by train_backdoored "
                      "(or restored from a model record)")
        self.nets.to(x.device).eval()
        with torch.no_grad():
            return torch.cat([_to_uint8(self.triggered(to_unit(part))) for part in x.split(self.chunk)])

    def batches(self, data: ImageData, batch_size: int, generator: torch.Generator):
        """Shuffled full batches of clean training images (uint8), one epoch."""
        count = len(data.y_train)
        batch = min(batch_size, count)
        order = torch.randperm(count, generator=generator)
        for step in range(count // batch):
            yield data.x_train[order[step * batch:(step + 1) * batch]]


class SSBA(LearnedTrigger):
    """Sample-specific: an encoder hides a fixed `bits`-bit code in each image as a residual bounded by
    `max_residual`, so every poisoned image carries its own, nearly invisible, trigger.

    The residual is max_residual·tanh(E(x, code)) times the image's local contrast (relative to its mean, capped
    at 1): it sits in the image's texture and vanishes where the image is flat, as StegaStamp's residuals do
    under its perceptual losses. `learn` trains the encoder E (four 3×3 convolutions over the image and the code
    as constant planes) with a decoder (two stride-2 convolutions, pooling, a linear layer) to recover random
    codes from the encoded images: StegaStamp's scheme at a small size, with the contrast map and the bound in
    place of its image losses. The record keeps the encoder; the code comes from `code_seed`. BackdoorBench
    instead reads images encoded offline by a StegaStamp model it does not ship.
    """

    name = "ssba"
    params_type = SSBAParams

    def check(self) -> None:
        super().check()
        p = self.params
        for name in ("bits", "width", "encoder_epochs"):
            if getattr(p, name) < 1:
                self.fail(name, f"must be >= 1, got {getattr(p, name)}")
        if not 0 < p.max_residual <= 1:
            self.fail("max_residual", f"must be in (0, 1], got {p.max_residual}")
        if not p.encoder_lr > 0:
            self.fail("encoder_lr", f"must be > 0, got {p.encoder_lr}")

    def networks(self) -> nn.ModuleDict:
        channels, width = self.shape[0], self.params.width
        return nn.ModuleDict({"encoder": nn.Sequential(
            *_block(channels + self.params.bits, width, False), *_block(width, width, False),
            *_block(width, width, False), nn.Conv2d(width, channels, 1))})

    def code(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.params.code_seed)
        return torch.randint(0, 2, (self.params.bits,), generator=generator).float()

    def residual(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        planes = codes[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        return self.params.max_residual * torch.tanh(self.nets["encoder"](torch.cat([x, planes], 1))) * _texture(x)

    def triggered(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.residual(x, self.code().to(x.device).expand(len(x), -1))).clamp(0, 1)

    def learn(self, data: ImageData, seed: int, *, batch_size: int, device: torch.device) -> None:
        p, channels = self.params, self.shape[0]
        self.fresh_networks(seed, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            decoder = nn.Sequential(
                nn.Conv2d(channels, p.width, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(p.width, 2 * p.width, 3, stride=2, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * p.width, p.bits)).to(device)
        optimizer = torch.optim.Adam([*self.nets.parameters(), *decoder.parameters()], lr=p.encoder_lr)
        generator = torch.Generator().manual_seed(seed)
        self.nets.train()
        for _ in range(p.encoder_epochs):
            for images in self.batches(data, batch_size, generator):
                x = to_unit(images).to(device)
                codes = torch.randint(0, 2, (len(x), p.bits), generator=generator).float().to(device)
                decoded = decoder((x + self.residual(x, codes)).clamp(0, 1))
                loss = F.binary_cross_entropy_with_logits(decoded, codes)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.nets.zero_grad(set_to_none=True)
        self.nets.eval()
        self.state = self.nets.state_dict()


class InputAware(LearnedTrigger, InBatchAttack):
    """Input-aware dynamic backdoor (IAD): x + (G(x) − x)·M(x), a pattern from generator G through a sparse mask
    from generator M, both computed from the image itself.

    `learn` is stage 1: M alone for `mask_epochs` (Adam, lr ÷10 after epochs 10 and 20) on a sparsity loss,
    lambda_norm·mean(relu(M(x) − mask_density)), plus a diversity loss, lambda_div·mean(d(x, x′) / d(M(x), M(x′)))
    over pairs of images (d the per-sample RMS distance), which keeps masks of different images different. M is
    then frozen. In stage 2, each training batch's first round(poison_ratio·B) images are triggered and relabelled,
    the next round(cross_ratio·poison_ratio·B) get the pattern and mask of another image of the batch and keep their
    labels, the rest stay clean; G trains with the classifier on its loss plus the diversity loss of its patterns.
    Both generators' outputs are squashed to [0, 1] by (tanh + 1)/2; M's then becomes a near-binary mask by
    (tanh(20m − 10) + 1)/2.

    As in BackdoorBench, the second image of a pair is another image of the batch (BackdoorBench draws it from a
    second loader), and the classifier's optimizer is the training recipe's (BackdoorBench: SGD at a constant lr).
    The classifier trains for the recipe's epochs after stage 1, where BackdoorBench counts both stages in one.
    """

    name = "inputaware"
    params_type = InputAwareParams
    epsilon: ClassVar[float] = 1e-7  # keeps the diversity ratio finite

    def check(self) -> None:
        super().check()
        p, (_, height, width) = self.params, self.shape
        if min(height, width) < 8:
            self.fail("shape", f"the generators pool three times: images must be at least 8x8, got {height}x{width}")
        for name in ("mask_epochs", "width"):
            if getattr(p, name) < 1:
                self.fail(name, f"must be >= 1, got {getattr(p, name)}")
        if not 0 < p.mask_density < 1:
            self.fail("mask_density", f"must be in (0, 1), got {p.mask_density}")
        for name in ("lambda_norm", "lambda_div"):
            if not getattr(p, name) >= 0:
                self.fail(name, f"must be >= 0, got {getattr(p, name)}")
        if not p.generator_lr > 0:
            self.fail("generator_lr", f"must be > 0, got {p.generator_lr}")

    def networks(self) -> nn.ModuleDict:
        channels, width = self.shape[0], self.params.width
        return nn.ModuleDict({"pattern": EncoderDecoder(channels, channels, width),
                              "mask": EncoderDecoder(channels, 1, width)})

    def pattern(self, x: torch.Tensor) -> torch.Tensor:
        return _squash(self.nets["pattern"](x))

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        # Squashed like a pattern first, so an untrained M gives masks near 0.5 where the threshold has a slope.
        return (torch.tanh(20 * _squash(self.nets["mask"](x)) - 10) + 1) / 2

    def triggered(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.pattern(x) - x) * self.mask(x)

    def _adam(self, net: nn.Module) -> torch.optim.Adam:
        return torch.optim.Adam(net.parameters(), lr=self.params.generator_lr, betas=(0.5, 0.9))

    def _diversity(self, x: torch.Tensor, other: torch.Tensor, out: torch.Tensor,
                   out_other: torch.Tensor) -> torch.Tensor:
        return self.params.lambda_div * (_distance(x, other) / (_distance(out, out_other) + self.epsilon)).mean()

    def learn(self, data: ImageData, seed: int, *, batch_size: int, device: torch.device) -> None:
        p = self.params
        self.fresh_networks(seed, device)
        mask_net = self.nets["mask"].train()
        optimizer = self._adam(mask_net)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10, 20], gamma=0.1)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(p.mask_epochs):
            for images in self.batches(data, batch_size, generator):
                x = to_unit(images).to(device)
                other = x.roll(1, 0)
                masks, masks_other = self.mask(x), self.mask(other)
                loss = (p.lambda_norm * F.relu(masks - p.mask_density).mean()
                        + self._diversity(x, other, masks, masks_other))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()
        mask_net.zero_grad(set_to_none=True)
        mask_net.eval().requires_grad_(False)
        self.state = self.nets.state_dict()

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._adam(self.nets["pattern"])]

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backdoor, cross and clean parts, in that order (see the class docstring); the extra loss is the
        patterns' diversity loss. The other image of sample i is sample i − 1 of the batch."""
        n_bd, n_cross = self.split(len(x))
        if n_bd + n_cross == 0:
            return x, y, x.new_zeros(())
        other = x.roll(1, 0)
        self.nets["pattern"].train()
        sources = torch.cat([x[:n_bd], other[:n_bd + n_cross]])
        patterns = self.pattern(sources)
        with torch.no_grad():
            masks = self.mask(sources)
        own, others = slice(0, n_bd), slice(n_bd, 2 * n_bd + n_cross)
        bd = x[:n_bd] + (patterns[own] - x[:n_bd]) * masks[own]
        cross_x = x[n_bd:n_bd + n_cross]
        cross = cross_x + (patterns[others][n_bd:] - cross_x) * masks[others][n_bd:]
        extra = (self._diversity(x[:n_bd], other[:n_bd], patterns[own], patterns[others][:n_bd])
                 if n_bd else x.new_zeros(()))
        labels = torch.cat([self.backdoor_labels(y[:n_bd]), y[n_bd:]])
        return torch.cat([bd, cross, x[n_bd + n_cross:]]), labels, extra
