"""Backdoor attacks on uint8 N×C×H×W images, by name: the registry and `make_attack`.

Data-poisoning BadNets, Blended and SIG (`pixel`); LF and Trojan, whose triggers are optimised against a clean
model (`optimized`); training-controlled WaNet (`wanet`); InputAware and SSBA, whose triggers are networks the
project trains (`learned`); and ImportedAttack, known only through its poisoned test set (`imported`)."""

import dataclasses
import math

from .base import Attack, AttackError, PoisonParams
from .imported import ImportedAttack
from .learned import SSBA, InputAware, InputAwareParams, SSBAParams
from .optimized import LF, LFParams, Trojan, TrojanParams
from .pixel import SIG, BadNets, BadNetsParams, Blended, BlendedParams, SIGParams
from .wanet import WaNet, WaNetParams

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (BadNets, Blended, SIG, WaNet, InputAware, LF, SSBA, Trojan, ImportedAttack)}


def _coerce(attack: str, field: dataclasses.Field, value):
    """Check a parameter against its default's type; ints are accepted where floats are expected."""
    kind = type(field.default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**1023 else math.inf  # float() would raise OverflowError
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
    try:
        typed = cls.params_type(**values)
    except ValueError as error:  # PoisonParams' own "field: reason"
        raise AttackError(f"attack {name}: {error}") from None
    return cls(typed, tuple(shape), num_classes, state)

__all__ = [
    "ATTACKS", "Attack", "AttackError", "BadNets", "BadNetsParams", "Blended", "BlendedParams", "ImportedAttack",
    "InputAware", "InputAwareParams", "LF", "LFParams", "PoisonParams", "SIG", "SIGParams", "SSBA", "SSBAParams", "Trojan", "TrojanParams", "WaNet", "WaNetParams",
    "make_attack",
]
