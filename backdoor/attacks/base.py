"""The attack interface: parameters, trigger state, poisoning and labelling rules."""

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, NoReturn

import torch
from torch import nn

from ..data import ImageData


class AttackError(ValueError):
    """Invalid attack configuration: "attack <name>: <param>: <reason>"."""


# torch.Generator.manual_seed's range: a seed parameter seeds one generator as it is.
SEED_LIMIT = 2**63


@dataclass(frozen=True)
class PoisonParams:
    target: int = 0
    poison_ratio: float = 0.1
    label_mode: str = "all2one"

    def __post_init__(self) -> None:
        """Ranges every attack shares; each attack checks its own in Attack.check, against the data."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):  # inf or nan make a trigger of nan pixels
                raise ValueError(f"{field.name}: must be a finite number, got {value!r}")
            if field.name.endswith("_seed") and isinstance(value, int) and not 0 <= value < SEED_LIMIT:
                raise ValueError(f"{field.name}: must be in [0, 2**63), got {value!r}")




def draw(pool: torch.Tensor, count: int, seed: int) -> torch.Tensor:
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
    # The trigger is a network trained on the clean training images: the state stays empty until
    # train_backdoored calls learn.
    learns_trigger: ClassVar[bool] = False

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

    def learn(self, data: ImageData, seed: int, *, batch_size: int, device: torch.device) -> None:
        """Train the trigger's networks on the clean training images (learns_trigger attacks only)."""
        raise NotImplementedError

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Poison a training batch of float images in [0, 1] (in_batch attacks only).

        Returns the images, their labels and the attack's own loss term, which the training loop adds to the
        classifier's loss (a zero tensor for an attack that trains nothing)."""
        raise NotImplementedError

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers of networks the attack trains jointly with the classifier, stepped with its optimizer."""
        return []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def backdoor_labels(self, y: torch.Tensor) -> torch.Tensor:
        if self.params.label_mode == "all2all":
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.params.target)

    def poison_indices(self, y: torch.Tensor, seed: int) -> torch.Tensor:
        """round(poison_ratio·N) sample indices drawn from all classes."""
        return draw(torch.arange(len(y)), round(self.params.poison_ratio * len(y)), seed)

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


def add_clipped(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """clip(round(x + delta), 0, 255) as uint8, for an additive trigger on the 0-255 scale."""
    return (x.float() + delta.to(x.device)).round().clamp(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class InBatchParams(PoisonParams):
    cross_ratio: float = 1.0  # cross samples per backdoor sample in each batch


class InBatchAttack(Attack):
    """A training-controlled attack: each training batch holds backdoor samples, cross samples that keep their
    labels, and clean ones, in that order."""

    in_batch = True

    def check(self) -> None:
        super().check()
        p = self.params
        if not p.cross_ratio >= 0:
            self.fail("cross_ratio", f"must be >= 0, got {p.cross_ratio}")
        if (1 + p.cross_ratio) * p.poison_ratio > 1:
            self.fail("cross_ratio", f"(1 + cross_ratio)·poison_ratio must be <= 1, got "
                      f"(1 + {p.cross_ratio})·{p.poison_ratio}")

    def poison_train(self, x: torch.Tensor, y: torch.Tensor,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training set as it is, with no poisoned indices: poison_batch poisons each batch instead."""
        return x, y, torch.empty(0, dtype=torch.int64)

    def split(self, batch: int) -> tuple[int, int]:
        """The backdoor and cross sample counts of a batch: round(poison_ratio·B) and round(cross_ratio·
        poison_ratio·B), the second cut so that both fit (rounding can overshoot by one)."""
        p = self.params
        n_bd = round(p.poison_ratio * batch)
        return n_bd, min(round(p.cross_ratio * p.poison_ratio * batch), batch - n_bd)
