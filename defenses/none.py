"""`none`: the backdoored model as it is, the "no defense" row of a table."""
from __future__ import annotations

import copy
from dataclasses import dataclass

from sau_kernel import PurifyResult

from .base import Defense


@dataclass(frozen=True)
class NoParams:
    """`none` has no parameters."""


class NoDefense(Defense):
    name = "none"
    params_type = NoParams
    id_fields = frozenset()
    per_model = True

    @staticmethod
    def purify(model, x_clean, y_clean, config, *, device, on_round=None, resume=None) -> PurifyResult:
        return PurifyResult(copy.deepcopy(model).to(device).eval(), [])
