"""Attacks whose trigger is optimised against a clean model the project trains first: LF and Trojan."""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageData, to_unit
from .base import Attack, PoisonParams, add_clipped, draw


@dataclass(frozen=True)
class LFParams(PoisonParams):
    clean_epochs: int = 10  # training of the clean model the perturbation is fitted to
    passes: int = 5  # over the images, at most
    images: int = 100  # seeded training images the universal perturbation is fitted to
    steps: int = 10  # targeted DeepFool iterations per image and pass, at most
    sigma: float = 1.0  # of the Gaussian low-pass filter, in pixels
    max_value: float = 0.2  # the pattern spans [0, max_value] on the [0, 1] scale


@dataclass(frozen=True)
class TrojanParams(PoisonParams):
    clean_epochs: int = 10  # training of the clean model whose neurons the trigger excites
    neurons: int = 2  # of the layer feeding the last linear layer, with the largest summed |weight| into it
    steps: int = 200  # sign-gradient steps
    step_size: float = 0.1  # on the [0, 1] scale
    target_value: float = 100.0  # the activation the selected neurons are pushed toward
    trigger_seed: int = 0  # the pattern's random start


class ModelTriggered(Attack):
    """Base of the attacks whose trigger `prepare` computes from a clean model; unprepared, the state is empty."""

    needs_model = True

    def check(self) -> None:
        super().check()
        if self.params.clean_epochs < 1:
            self.fail("clean_epochs", f"must be >= 1, got {self.params.clean_epochs}")

    def make_state(self) -> dict[str, torch.Tensor]:
        return {}

    def trigger(self) -> dict[str, torch.Tensor]:
        if not self.state:
            self.fail("state", "not prepared: the trigger is computed from a clean model by train_backdoored "
                      "(or restored from a model record)")
        return self.state


class LF(ModelTriggered):
    """Low frequency: a smooth universal perturbation that pushes a clean model toward the target, added and clipped.

    prepare fits it to `images` seeded training images, as BackdoorBench's generate_pattern.py does: in each pass,
    every image the clean model does not yet call the target under x + v gets a targeted DeepFool perturbation
    (linearise the gap between its top class and the target, step across it with 2% overshoot, up to `steps` times),
    v grows by it and is low-pass filtered (Gaussian, `sigma` px) and clipped to ±max_value; passes stop early when
    every image is already fooled. The pattern is v min-max scaled to [0, max_value] (gauss_smooth.normalization),
    and apply is clip(round(x + 255·pattern)).
    """

    name = "lf"
    params_type = LFParams
    state_dtypes = {"pattern": torch.float32}
    overshoot: ClassVar[float] = 0.02  # DeepFool's default

    def check(self) -> None:
        super().check()
        p = self.params
        if p.label_mode != "all2one":
            self.fail("label_mode", "must be all2one: the perturbation pushes toward one target class")
        for name in ("passes", "images", "steps"):
            if getattr(p, name) < 1:
                self.fail(name, f"must be >= 1, got {getattr(p, name)}")
        if not p.sigma > 0:
            self.fail("sigma", f"must be > 0, got {p.sigma}")
        if not 0 < p.max_value <= 1:
            self.fail("max_value", f"must be in (0, 1], got {p.max_value}")

    def prepare(self, model: nn.Module, data: ImageData, seed: int) -> None:
        p = self.params
        if p.images > len(data.y_train):
            self.fail("images", f"must be <= the {len(data.y_train)} training images, got {p.images}")
        device = next(model.parameters()).device
        x = to_unit(data.x_train[draw(torch.arange(len(data.y_train)), p.images, seed)]).to(device)
        model.eval()
        v = torch.zeros(self.shape, device=device)
        for _ in range(p.passes):
            moved = False
            for image in x:
                step = self._toward_target(model, (image + v).clamp(0, 1))
                if step is not None:
                    v = _gaussian_blur(v + step, p.sigma).clamp(-p.max_value, p.max_value)
                    moved = True
            if not moved:
                break
        low, high = v.min(), v.max()
        if not high > low:
            self.fail("images", f"the clean model already calls all {p.images} images class {p.target}: "
                      "there is no perturbation to fit")
        pattern = (v - low) / (high - low) * p.max_value
        self.state = self.checked_state({"pattern": pattern.cpu()})

    def _toward_target(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Targeted DeepFool on one image in [0, 1]: the step toward the target, or None if x is called it already."""
        target, r = self.params.target, torch.zeros_like(x)
        for _ in range(self.params.steps):
            moved = (x + (1 + self.overshoot) * r).clamp(0, 1).requires_grad_(True)
            logits = model(moved[None])[0]
            top = int(logits.argmax())
            if top == target:
                break
            gap = logits[top] - logits[target]
            (toward,) = torch.autograd.grad(-gap, moved)  # the gradient of f_target - f_top
            r = r + (gap.detach() + 1e-4) / toward.square().sum().clamp_min(1e-12) * toward
        return (1 + self.overshoot) * r if r.any() else None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return add_clipped(x, 255 * self.trigger()["pattern"])


def _gaussian_blur(v: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian low-pass filter of a C×H×W tensor, reflecting at the borders (radius 3σ, within it)."""
    channels, height, width = v.shape
    radius = min(math.ceil(3 * sigma), height - 1, width - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=v.dtype, device=v.device)
    kernel = torch.exp(-offsets.square() / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    out = F.pad(v[None], (radius,) * 4, mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return out[0]


class Trojan(ModelTriggered):
    """TrojanNN: a square patch whose pixels are optimised to excite chosen neurons of a clean model, added and clipped.

    The mask is a square of side round(H/3) × round(W/3) (about 1/9 of the image) in the bottom-right quadrant,
    ending H//8 and W//8 pixels from the bottom and right edges; it stands in for BackdoorBench's apple image.
    prepare picks the `neurons` inputs of the model's last nn.Linear with the largest summed |weight| into it and
    runs `steps` sign-gradient steps on the masked pattern alone (from a seeded uniform start, kept in [0, 1]) to
    bring their activations to `target_value`. apply is clip(x + pattern·mask): the sum is clipped, where
    BackdoorBench casts it to uint8 first and so wraps values above 255.
    """

    name = "trojan"
    params_type = TrojanParams
    state_dtypes = {"mask": torch.bool, "pattern": torch.uint8}

    def check(self) -> None:
        super().check()
        p = self.params
        for name in ("neurons", "steps"):
            if getattr(p, name) < 1:
                self.fail(name, f"must be >= 1, got {getattr(p, name)}")
        if not p.step_size > 0:
            self.fail("step_size", f"must be > 0, got {p.step_size}")

    def square(self) -> torch.Tensor:
        _, height, width = self.shape
        rows, cols = max(1, round(height / 3)), max(1, round(width / 3))
        bottom, right = height - height // 8, width - width // 8
        mask = torch.zeros(self.shape, dtype=torch.bool)
        mask[:, bottom - rows:bottom, right - cols:right] = True
        return mask

    def prepare(self, model: nn.Module, data: ImageData, seed: int) -> None:
        p = self.params
        last = [module for module in model.modules() if isinstance(module, nn.Linear)]
        if not last:
            self.fail("neurons", "the model has no nn.Linear layer whose input neurons could be excited")
        layer = last[-1]
        if p.neurons > layer.in_features:
            self.fail("neurons", f"must be <= the {layer.in_features} inputs of the last linear layer, "
                      f"got {p.neurons}")
        chosen = layer.weight.detach().abs().sum(0).topk(p.neurons).indices
        seen = []
        hook = layer.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
        device = layer.weight.device
        mask = self.square().to(device)
        start = torch.rand(self.shape, generator=torch.Generator().manual_seed(p.trigger_seed))
        pattern = (start.to(device) * mask).requires_grad_(True)
        model.eval()
        try:
            for _ in range(p.steps):
                seen.clear()
                model(pattern[None])
                loss = (seen[0][0, chosen] - p.target_value).square().mean()
                (grad,) = torch.autograd.grad(loss, pattern)
                with torch.no_grad():
                    pattern -= p.step_size * grad.sign() * mask
                    pattern.clamp_(0, 1)
        finally:
            hook.remove()
        pattern = (pattern.detach() * 255).round().to(torch.uint8) * mask
        self.state = self.checked_state({"mask": mask.cpu(), "pattern": pattern.cpu()})

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        state = self.trigger()
        return add_clipped(x, (state["pattern"] * state["mask"]).float())
