"""Shared Adversarial Unlearning (Wei et al., NeurIPS 2023), with the reference code's semantics; torch only."""
from .config import MAX_SEED, PGD_INITS, SAUConfig, SAUConfigError
from .losses import js_divergence, sau_loss, shared_pgd
from .purify import Diverged, Progress, PurifyResult, RoundLog, purify

__all__ = ["Diverged", "MAX_SEED", "PGD_INITS", "Progress", "PurifyResult", "RoundLog", "SAUConfig", "SAUConfigError",
           "js_divergence", "purify", "sau_loss", "shared_pgd"]
