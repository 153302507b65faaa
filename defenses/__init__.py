"""Backdoor defenses by name: the registry. Each defense is one module; torch, backdoor and sau_kernel only.

`sau` (Shared Adversarial Unlearning), `none` (the backdoored model as it is) and `ft` (fine-tuning with
SAU's budget). A new defense is a module with a Defense subclass, added to DEFENSES."""

from .base import Defense
from .ft import FineTuning, FTConfig
from .none import NoDefense, NoParams
from .sau import SAU

DEFENSES: dict[str, type[Defense]] = {cls.name: cls for cls in (SAU, NoDefense, FineTuning)}

__all__ = ["DEFENSES", "Defense", "FTConfig", "FineTuning", "NoDefense", "NoParams", "SAU"]
