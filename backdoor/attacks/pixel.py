"""Data-poisoning attacks with a fixed pixel-space trigger: BadNets, Blended and clean-label SIG."""

import math
from dataclasses import dataclass

import torch

from .base import Attack, PoisonParams, add_clipped, draw

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left")


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
        return add_clipped(x, self.state["pattern"])

    def poison_indices(self, y: torch.Tensor, seed: int) -> torch.Tensor:
        """round(poison_ratio·N) target-class samples (a ratio of the whole set, as in BackdoorBench).

        Being of the target class already, they keep their labels when poison_train relabels them."""
        p = self.params
        count, pool = round(p.poison_ratio * len(y)), (y == p.target).nonzero().flatten()
        if count > len(pool):
            self.fail("poison_ratio", f"{p.poison_ratio} asks for {count} images of class {p.target}, which has "
                      f"{len(pool)}; the largest possible ratio is {largest_ratio(len(pool), len(y))}")
        return draw(pool, count, seed)


def largest_ratio(count: int, n: int) -> float:
    """The largest ratio r with round(r·n) <= count, to `len(str(n))` decimals (finer than 1/n)."""
    scale = 10 ** len(str(n))
    steps = (2 * count + 1) * scale // (2 * n)  # floor of (count + 0.5)/n in units of 1/scale
    while round(steps / scale * n) > count:  # at (count + 0.5)/n itself, round() may go up
        steps -= 1
    return steps / scale
