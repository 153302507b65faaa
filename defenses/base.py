"""The interface every defense implements: purify a copy of a backdoored model on a small clean set."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from sau_kernel import Progress, PurifyResult


class Defense(ABC):
    """A defense is a class with a name, a frozen dataclass of parameters and a `purify` function.

    `params_type` has a `seed` field unless the defense draws nothing at random. `id_fields` are the parameters
    that enter a trial id even at their default value: the fields the defense had when it was registered. A field
    added later enters the id only when it differs from its default, so earlier rows keep their ids
    (docs/design.md, "Trial identity"). `per_model` defenses use no clean data and no parameters: one trial per
    backdoored model, whatever the other axes of the grid."""

    name: ClassVar[str]
    params_type: ClassVar[type]
    id_fields: ClassVar[frozenset[str]]
    per_model: ClassVar[bool] = False

    @staticmethod
    @abstractmethod
    def purify(model: nn.Module, x_clean: Tensor, y_clean: Tensor, config: Any, *, device: torch.device,
               on_round: Callable[[Progress], None] | None = None,
               resume: dict[str, Any] | None = None) -> PurifyResult:
        """Purify a copy of `model` (left untouched) on x_clean in [0, 1] with labels y_clean.

        After every round `on_round` gets a Progress whose `state_dict()` is what `resume` continues from
        exactly; the RoundLog's loss terms a defense does not have are 0."""
