"""`sau`: Shared Adversarial Unlearning, the kernel as it is."""
from __future__ import annotations

from sau_kernel import SAUConfig, purify

from .base import Defense


class SAU(Defense):
    name = "sau"
    params_type = SAUConfig
    # SAUConfig's fields when trial ids were first defined; a field added since is hashed only off its default.
    id_fields = frozenset({"eps", "pgd_steps", "pgd_step_size", "pgd_init", "beta_adv", "beta_js", "lmd_clean",
                           "lmd_at", "lmd_sar", "lr", "rounds", "batch_size", "train_bn", "seed"})
    purify = staticmethod(purify)
