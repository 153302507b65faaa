"""WaNet: a training-controlled attack that warps images inside each training batch."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import InBatchAttack, InBatchParams


@dataclass(frozen=True)
class WaNetParams(InBatchParams):
    grid_k: int = 4  # side of the random control grid
    strength: float = 0.5  # s: sampling points move by s·field/H in grid_sample's [-1, 1] coordinates
    cross_ratio: float = 2.0  # noise-mode samples per backdoor sample in each batch
    grid_seed: int = 0


class WaNet(InBatchAttack):
    """Training-controlled warping: every image is resampled through one fixed, smooth, seeded warp field.

    In each training batch the first round(poison_ratio·B) images are warped and relabelled, the next
    round(cross_ratio·poison_ratio·B) are warped through the field plus per-sample noise and keep their labels
    (noise mode: only the exact warp may trigger), the rest stay clean. The state is the upsampled field, H×W×2.
    """

    name = "wanet"
    params_type = WaNetParams
    state_dtypes = {"field": torch.float32}

    def check(self) -> None:
        super().check()
        p, (_, height, width) = self.params, self.shape
        if not 2 <= p.grid_k <= min(height, width):
            self.fail("grid_k", f"must be between 2 and {min(height, width)} (image is {height}x{width}), "
                      f"got {p.grid_k}")
        if not p.strength > 0:
            self.fail("strength", f"must be > 0, got {p.strength}")

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

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backdoor, noise-mode and clean parts, in that order (see the class docstring).

        `generator` draws the noise-mode offsets, so a seeded training loop stays deterministic."""
        _, height, width = self.shape
        n_bd, n_noise = self.split(len(x))
        grid = self.grid(x.device)
        noise = (torch.rand(n_noise, height, width, 2, generator=generator) * 2 - 1).to(x.device) / height
        bd, noisy, clean = x[:n_bd], x[n_bd:n_bd + n_noise], x[n_bd + n_noise:]
        x = torch.cat([self._warp(bd, grid), self._warp(noisy, (grid + noise).clamp(-1, 1)), clean])
        return x, torch.cat([self.backdoor_labels(y[:n_bd]), y[n_bd:]]), x.new_zeros(())
