"""Backdoor attacks on uint8 N×C×H×W images: data-poisoning BadNets, Blended and SIG; LF and Trojan, whose
triggers are computed from a clean model; training-controlled WaNet, which poisons inside each training batch; and
ImportedAttack, another benchmark's attack known only through its poisoned test set."""

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageData, to_unit

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left")


class AttackError(ValueError):
    """Invalid attack configuration: "attack <name>: <param>: <reason>"."""


@dataclass(frozen=True)
class PoisonParams:
    target: int = 0
    poison_ratio: float = 0.1
    label_mode: str = "all2one"


@dataclass(frozen=True)
class BadNetsParams(PoisonParams):
    patch_size: int = 3
    position: str = "bottom-right"
    pattern: str = "white"


@dataclass(frozen=True)
class BlendedParams(PoisonParams):
    alpha: float = 0.2
    pattern_seed: int = 0


@dataclass(frozen=True)
class SIGParams(PoisonParams):
    delta: float = 40.0  # amplitude on the 0-255 scale
    frequency: int = 6  # sine periods across the image width


@dataclass(frozen=True)
class WaNetParams(PoisonParams):
    grid_k: int = 4  # side of the random control grid
    strength: float = 0.5  # s: sampling points move by s·field/H in grid_sample's [-1, 1] coordinates
    cross_ratio: float = 2.0  # noise-mode samples per backdoor sample in each batch
    grid_seed: int = 0


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


def _draw(pool: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` entries of `pool` drawn without replacement from `seed`, sorted."""
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return pool[order[:count]].sort().values


class Attack:
    """A trigger (held as tensors in `state_dict()`) plus the poisoning and labelling rules."""

    name: ClassVar[str]
    params_type: ClassVar[type]
    state_dtypes: ClassVar[dict[str, torch.dtype]]
    # Training-controlled: the training set stays clean and train_backdoored calls poison_batch on every batch.
    in_batch: ClassVar[bool] = False
    # The trigger is computed from a clean model: the state stays empty until train_backdoored calls prepare.
    needs_model: ClassVar[bool] = False

    def __init__(self, params: PoisonParams, shape: tuple[int, int, int], num_classes: int,
                 state: dict | None = None):
        self.params, self.shape, self.num_classes = params, shape, num_classes
        self.check()
        self.state = self.make_state() if state is None else self.checked_state(state)

    def fail(self, param: str, reason: str) -> NoReturn:
        raise AttackError(f"attack {self.name}: {param}: {reason}")

    def check(self) -> None:
        p = self.params
        if not 0 <= p.poison_ratio <= 1:
            self.fail("poison_ratio", f"must be in [0, 1], got {p.poison_ratio}")
        if p.label_mode not in ("all2one", "all2all"):
            self.fail("label_mode", f"must be all2one or all2all, got {p.label_mode!r}")
        if not 0 <= p.target < self.num_classes:
            self.fail("target", f"must be in [0, {self.num_classes - 1}] ({self.num_classes} classes), got {p.target}")

    def checked_state(self, state: dict) -> dict[str, torch.Tensor]:
        if set(state) != set(self.state_dtypes):
            self.fail("state", f"expected tensors {sorted(self.state_dtypes)}, got {sorted(state)}")
        shapes = self.state_shapes()
        for key, dtype in self.state_dtypes.items():
            tensor = state[key]
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tuple(tensor.shape) != shapes[key]:
                self.fail(f"state.{key}", f"expected {dtype} tensor of shape {shapes[key]}")
        return {key: state[key].cpu() for key in self.state_dtypes}

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each state tensor: the image shape unless an attack says otherwise."""
        return {key: self.shape for key in self.state_dtypes}

    def make_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, model: nn.Module, data: ImageData, seed: int) -> None:
        """Compute the trigger from `model`, trained on `data` without poison (needs_model attacks only)."""
        raise NotImplementedError

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Poison a training batch of float images in [0, 1] (in_batch attacks only)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def backdoor_labels(self, y: torch.Tensor) -> torch.Tensor:
        if self.params.label_mode == "all2all":
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.params.target)

    def poison_indices(self, y: torch.Tensor, seed: int) -> torch.Tensor:
        """round(poison_ratio·N) sample indices drawn from all classes."""
        return _draw(torch.arange(len(y)), round(self.params.poison_ratio * len(y)), seed)

    def poison_train(self, x: torch.Tensor, y: torch.Tensor,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Trigger and relabel the samples `poison_indices` picks; returns (x, y, indices)."""
        index = self.poison_indices(y, seed)
        x, y = x.clone(), y.clone()
        x[index] = self.apply(x[index])
        y[index] = self.backdoor_labels(y[index])
        return x, y, index

    def test_set(self, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Triggered test images, their backdoor labels and true labels; all2one leaves out the target class."""
        keep = y != self.params.target if self.params.label_mode == "all2one" else torch.ones_like(y, dtype=torch.bool)
        return self.apply(x[keep]), self.backdoor_labels(y[keep]), y[keep]


class BadNets(Attack):
    """A square patch that replaces the pixels under it, in every channel."""

    name = "badnets"
    params_type = BadNetsParams
    state_dtypes = {"mask": torch.bool, "patch": torch.uint8}

    def check(self) -> None:
        super().check()
        p, (_, height, width) = self.params, self.shape
        if not 1 <= p.patch_size <= min(height, width):
            self.fail("patch_size", f"must be between 1 and {min(height, width)} (image is {height}x{width})")
        if p.position not in POSITIONS:
            self.fail("position", f"must be one of {', '.join(POSITIONS)}, got {p.position!r}")
        if p.pattern not in ("white", "checkerboard"):
            self.fail("pattern", f"must be white or checkerboard, got {p.pattern!r}")

    def make_state(self) -> dict[str, torch.Tensor]:
        p, (_, height, width) = self.params, self.shape
        size = p.patch_size
        top = height - size if p.position.startswith("bottom") else 0
        left = width - size if p.position.endswith("right") else 0
        square = torch.full((size, size), 255, dtype=torch.uint8)
        if p.pattern == "checkerboard":
            parity = torch.arange(size)[:, None] + torch.arange(size)[None, :]
            square[parity % 2 == 1] = 0
        mask = torch.zeros(self.shape, dtype=torch.bool)
        patch = torch.zeros(self.shape, dtype=torch.uint8)
        mask[:, top:top + size, left:left + size] = True
        patch[:, top:top + size, left:left + size] = square
        return {"mask": mask, "patch": patch}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.state["mask"].to(x.device), self.state["patch"].to(x.device), x)


class Blended(Attack):
    """round((1 - alpha)·x + alpha·pattern) with a seeded uniform-noise pattern."""

    name = "blended"
    params_type = BlendedParams
    state_dtypes = {"pattern": torch.uint8}

    def check(self) -> None:
        super().check()
        if not 0 < self.params.alpha <= 1:
            self.fail("alpha", f"must be in (0, 1], got {self.params.alpha}")

    def make_state(self) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.params.pattern_seed)
        return {"pattern": torch.randint(0, 256, self.shape, generator=generator, dtype=torch.uint8)}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        alpha, pattern = self.params.alpha, self.state["pattern"].to(x.device).float()
        return ((1 - alpha) * x.float() + alpha * pattern).round().to(torch.uint8)


class SIG(Attack):
    """Clean-label: clip(round(x + delta·sin(2π·j·frequency/W))) at column j, on target-class images only."""

    name = "sig"
    params_type = SIGParams
    state_dtypes = {"pattern": torch.float32}

    def check(self) -> None:
        super().check()
        p, width = self.params, self.shape[2]
        if p.label_mode != "all2one":
            self.fail("label_mode", "must be all2one: SIG is clean-label, poisoned images keep their target label")
        if not 0 < p.delta <= 255:
            self.fail("delta", f"must be in (0, 255], got {p.delta}")
        if p.frequency < 1:
            self.fail("frequency", f"must be >= 1, got {p.frequency}")
        if 2 * p.frequency % width == 0:
            # The sine is then sampled at its zeros only: the trigger would change no pixel.
            self.fail("frequency", f"must not be a multiple of {width}/2 (image width {width}), got {p.frequency}")

    def make_state(self) -> dict[str, torch.Tensor]:
        p, (channels, height, width) = self.params, self.shape
        columns = torch.arange(width, dtype=torch.float64)
        wave = p.delta * torch.sin(2 * math.pi * columns * p.frequency / width)
        return {"pattern": wave.to(torch.float32).expand(channels, height, width).contiguous()}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return _add_clipped(x, self.state["pattern"])

    def poison_indices(self, y: torch.Tensor, seed: int) -> torch.Tensor:
        """round(poison_ratio·N) target-class samples (a ratio of the whole set, as in BackdoorBench).

        Being of the target class already, they keep their labels when poison_train relabels them."""
        p = self.params
        count, pool = round(p.poison_ratio * len(y)), (y == p.target).nonzero().flatten()
        if count > len(pool):
            self.fail("poison_ratio", f"{p.poison_ratio} asks for {count} images of class {p.target}, which has "
                      f"{len(pool)}; the largest possible ratio is {_largest_ratio(len(pool), len(y))}")
        return _draw(pool, count, seed)


def _add_clipped(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """clip(round(x + delta), 0, 255) as uint8, for an additive trigger on the 0-255 scale."""
    return (x.float() + delta.to(x.device)).round().clamp(0, 255).to(torch.uint8)


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
        x = to_unit(data.x_train[_draw(torch.arange(len(data.y_train)), p.images, seed)]).to(device)
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
        return _add_clipped(x, 255 * self.trigger()["pattern"])


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
        return _add_clipped(x, (state["pattern"] * state["mask"]).float())


class WaNet(Attack):
    """Training-controlled warping: every image is resampled through one fixed, smooth, seeded warp field.

    In each training batch the first round(poison_ratio·B) images are warped and relabelled, the next
    round(cross_ratio·poison_ratio·B) are warped through the field plus per-sample noise and keep their labels
    (noise mode: only the exact warp may trigger), the rest stay clean. The state is the upsampled field, H×W×2.
    """

    name = "wanet"
    params_type = WaNetParams
    state_dtypes = {"field": torch.float32}
    in_batch = True

    def check(self) -> None:
        super().check()
        p, (_, height, width) = self.params, self.shape
        if not 2 <= p.grid_k <= min(height, width):
            self.fail("grid_k", f"must be between 2 and {min(height, width)} (image is {height}x{width}), "
                      f"got {p.grid_k}")
        if not p.strength > 0:
            self.fail("strength", f"must be > 0, got {p.strength}")
        if not p.cross_ratio >= 0:
            self.fail("cross_ratio", f"must be >= 0, got {p.cross_ratio}")
        if (1 + p.cross_ratio) * p.poison_ratio > 1:
            self.fail("cross_ratio", f"(1 + cross_ratio)·poison_ratio must be <= 1, got "
                      f"(1 + {p.cross_ratio})·{p.poison_ratio}")

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"field": (*self.shape[1:], 2)}

    def make_state(self) -> dict[str, torch.Tensor]:
        p, (_, height, width) = self.params, self.shape
        generator = torch.Generator().manual_seed(p.grid_seed)
        coarse = torch.rand(1, 2, p.grid_k, p.grid_k, generator=generator) * 2 - 1
        coarse = coarse / coarse.abs().mean()
        field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
        return {"field": field[0].permute(1, 2, 0).contiguous()}

    def grid(self, device: torch.device) -> torch.Tensor:
        """The warped sampling grid, H×W×2 as (x, y) in [-1, 1] for grid_sample(align_corners=True)."""
        _, height, width = self.shape
        rows, cols = torch.linspace(-1, 1, height), torch.linspace(-1, 1, width)
        identity = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=2)
        # Scaled by the height for both axes, as BackdoorBench does (its images are square).
        return (identity + self.params.strength * self.state["field"] / height).clamp(-1, 1).to(device)

    @staticmethod
    def _warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Resample float images N×C×H×W through `grid` (H×W×2 shared, or N×H×W×2 per image)."""
        grid = grid.expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        warped = self._warp(x.float(), self.grid(x.device))
        return warped.round().clamp(0, 255).to(torch.uint8)

    def poison_train(self, x: torch.Tensor, y: torch.Tensor,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training set as it is, with no poisoned indices: poison_batch poisons each batch instead."""
        return x, y, torch.empty(0, dtype=torch.int64)

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Backdoor, noise-mode and clean parts, in that order (see the class docstring).

        `generator` draws the noise-mode offsets, so a seeded training loop stays deterministic."""
        p, (_, height, width) = self.params, self.shape
        n_bd = round(p.poison_ratio * len(x))
        n_noise = min(round(p.cross_ratio * p.poison_ratio * len(x)), len(x) - n_bd)  # rounding can overshoot by 1
        grid = self.grid(x.device)
        noise = (torch.rand(n_noise, height, width, 2, generator=generator) * 2 - 1).to(x.device) / height
        bd, noisy, clean = x[:n_bd], x[n_bd:n_bd + n_noise], x[n_bd + n_noise:]
        x = torch.cat([self._warp(bd, grid), self._warp(noisy, (grid + noise).clamp(-1, 1)), clean])
        return x, torch.cat([self.backdoor_labels(y[:n_bd]), y[n_bd:]])


def _largest_ratio(count: int, n: int) -> float:
    """The largest ratio r with round(r·n) <= count, to `len(str(n))` decimals (finer than 1/n)."""
    scale = 10 ** len(str(n))
    steps = (2 * count + 1) * scale // (2 * n)  # floor of (count + 0.5)/n in units of 1/scale
    while round(steps / scale * n) > count:  # at (count + 0.5)/n itself, round() may go up
        steps -= 1
    return steps / scale


class ImportedAttack(Attack):
    """An attack known only through its poisoned test set, as imported from another benchmark.

    The state is that set: triggered images `x_bd` (uint8 N×C×H×W), their backdoor labels `y_bd`, true labels
    `y_true` and indices `index` into the clean test set. Without the trigger nothing new can be poisoned.
    """

    name = "imported"
    params_type = PoisonParams
    state_dtypes = {"x_bd": torch.uint8, "y_bd": torch.int64, "y_true": torch.int64, "index": torch.int64}

    def checked_state(self, state: dict) -> dict[str, torch.Tensor]:
        if set(state) != set(self.state_dtypes):
            self.fail("state", f"expected tensors {sorted(self.state_dtypes)}, got {sorted(state)}")
        index = state["index"]
        count = len(index) if isinstance(index, torch.Tensor) and index.ndim == 1 else 0
        for key, dtype in self.state_dtypes.items():
            shape = (count, *self.shape) if key == "x_bd" else (count,)
            tensor = state[key]
            fits = isinstance(tensor, torch.Tensor) and tensor.dtype == dtype and tuple(tensor.shape) == shape
            if count == 0 or not fits:
                self.fail(f"state.{key}", f"expected a non-empty {dtype} tensor of shape (N, ...) = {shape}")
        for key in ("y_bd", "y_true"):
            if state[key].min() < 0 or state[key].max() >= self.num_classes:
                self.fail(f"state.{key}", f"labels must be in [0, {self.num_classes - 1}]")
        if index.min() < 0:
            self.fail("state.index", "indices must be >= 0")
        return {key: state[key].cpu() for key in self.state_dtypes}

    def make_state(self) -> NoReturn:
        self.fail("state", "required: an imported attack is its stored poisoned test set (from a model record)")

    def apply(self, x: torch.Tensor) -> NoReturn:
        self.fail("apply", "the trigger is unknown; only the poisoned test images were imported")

    def poison_train(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> NoReturn:
        self.fail("poison_train", "an imported model cannot be re-trained: its trigger is unknown")

    def test_set(self, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored poisoned test set, once its indices and true labels are checked against `y`."""
        index, y_true = self.state["index"], self.state["y_true"]
        if index.max() >= len(y) or not torch.equal(y[index], y_true):
            self.fail("state.index", f"the stored images' indices and true labels do not match this test set "
                      f"({len(y)} images)")
        return self.state["x_bd"], self.state["y_bd"], y_true


ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (BadNets, Blended, SIG, LF, Trojan, WaNet, ImportedAttack)}


def _coerce(attack: str, field: dataclasses.Field, value):
    """Check a parameter against its default's type; ints are accepted where floats are expected."""
    kind = type(field.default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise AttackError(f"attack {attack}: {field.name}: expected {kind.__name__}, got {value!r}")
    return value


def make_attack(name: str, params: dict, shape: tuple[int, int, int], num_classes: int,
                state: dict | None = None) -> Attack:
    """Build an attack; `state` (from a record) restores the trigger instead of generating it."""
    if name not in ATTACKS:
        raise AttackError(f"attack {name}: name: unknown attack (known: {', '.join(ATTACKS)})")
    cls = ATTACKS[name]
    fields = {field.name: field for field in dataclasses.fields(cls.params_type)}
    for key in params:
        if key not in fields:
            raise AttackError(f"attack {name}: {key}: unknown parameter (known: {', '.join(fields)})")
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise AttackError(f"attack {name}: shape: expected (C, H, W) positive ints, got {shape}")
    values = {key: _coerce(name, fields[key], value) for key, value in params.items()}
    return cls(cls.params_type(**values), tuple(shape), num_classes, state)
