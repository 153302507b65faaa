"""Backdoor attacks on uint8 N×C×H×W images: data-poisoning BadNets, Blended and SIG; training-controlled WaNet,
which poisons inside each training batch; and ImportedAttack, another benchmark's attack known only through its
poisoned test set."""

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, NoReturn

import torch
import torch.nn.functional as F

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
        return (x.float() + self.state["pattern"].to(x.device)).round().clamp(0, 255).to(torch.uint8)

    def poison_indices(self, y: torch.Tensor, seed: int) -> torch.Tensor:
        """round(poison_ratio·N) target-class samples (a ratio of the whole set, as in BackdoorBench).

        Being of the target class already, they keep their labels when poison_train relabels them."""
        p = self.params
        count, pool = round(p.poison_ratio * len(y)), (y == p.target).nonzero().flatten()
        if count > len(pool):
            self.fail("poison_ratio", f"{p.poison_ratio} asks for {count} images of class {p.target}, which has "
                      f"{len(pool)}; the largest possible ratio is {_largest_ratio(len(pool), len(y))}")
        return _draw(pool, count, seed)


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


ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (BadNets, Blended, SIG, WaNet, ImportedAttack)}


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
