"""SAU hyper-parameters, with the defaults of the paper and of its reference code."""
from __future__ import annotations

from dataclasses import dataclass, fields

PGD_INITS = ("max", "min", "zero", "random")
MODES = ("reference", "fast")  # the same function; see sau_kernel/fast.py


class SAUConfigError(ValueError):
    """An SAU parameter is out of range; the message is one line naming the field."""


@dataclass(frozen=True)
class SAUConfig:
    eps: float = 0.2  # L-inf bound of the shared perturbation, in pixel units ([0, 1] images)
    pgd_steps: int = 5
    pgd_step_size: float = 0.2
    pgd_init: str = "max"
    beta_adv: float = 0.01  # adversarial CE weight while generating (the paper's lambda_3)
    beta_js: float = 1.0  # Jensen-Shannon agreement weight while generating
    lmd_clean: float = 1.0
    lmd_at: float = 0.0
    lmd_sar: float = 1.0
    lr: float = 1e-4
    rounds: int = 100
    batch_size: int = 256
    train_bn: bool = False
    seed: int = 0
    mode: str = "reference"  # the readable code is the default; "fast" is shown to compute the same function

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            expected = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}[f.type]
            if not isinstance(value, expected) or (f.type != "bool" and isinstance(value, bool)):
                raise SAUConfigError(f"{f.name}: expected {f.type}, got {value!r}")
        checks = [
            ("eps", self.eps > 0, "must be > 0"),
            ("pgd_steps", self.pgd_steps >= 1, "must be >= 1"),
            ("pgd_step_size", self.pgd_step_size > 0, "must be > 0"),
            ("pgd_init", self.pgd_init in PGD_INITS, f"must be one of {', '.join(PGD_INITS)}"),
            ("mode", self.mode in MODES, f"must be one of {', '.join(MODES)}"),
            ("lr", self.lr > 0, "must be > 0"),
            ("rounds", self.rounds >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("seed", self.seed >= 0, "must be >= 0"),
        ]
        checks += [(name, getattr(self, name) >= 0, "must be >= 0")
                   for name in ("beta_adv", "beta_js", "lmd_clean", "lmd_at", "lmd_sar")]
        for name, ok, reason in checks:
            if not ok:
                raise SAUConfigError(f"{name}: {reason} (got {getattr(self, name)!r})")
