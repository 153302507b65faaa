"""Data-poisoning backdoor attacks on uint8 N×C×H×W images: BadNets and Blended."""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, NoReturn

import torch

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left")


class AttackError(ValueError):
    """Invalid attack configuration: "attack <name>: <param>: <reason>"."""


@dataclass(frozen=True)
class PoisonParams:
    target: int = 0
    poison_ratio: float = 0.1
    label_mode: str = "all2one"


@dataclass(frozen=True)
class BadNetsParams(PoisonParams):
    patch_size: int = 3
    position: str = "bottom-right"
    pattern: str = "white"


@dataclass(frozen=True)
class BlendedParams(PoisonParams):
    alpha: float = 0.2
    pattern_seed: int = 0


class Attack:
    """A trigger (held as tensors in `state_dict()`) plus the poisoning and labelling rules."""

    name: ClassVar[str]
    params_type: ClassVar[type]
    state_dtypes: ClassVar[dict[str, torch.dtype]]

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
        for key, dtype in self.state_dtypes.items():
            tensor = state[key]
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tuple(tensor.shape) != self.shape:
                self.fail(f"state.{key}", f"expected {dtype} tensor of shape {self.shape}")
        return {key: state[key].cpu() for key in self.state_dtypes}

    def make_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def backdoor_labels(self, y: torch.Tensor) -> torch.Tensor:
        if self.params.label_mode == "all2all":
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.params.target)

    def poison_train(self, x: torch.Tensor, y: torch.Tensor,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Trigger round(poison_ratio·N) samples drawn from all classes; returns (x, y, indices)."""
        count = round(self.params.poison_ratio * len(x))
        index = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:count].sort().values
        x, y = x.clone(), y.clone()
        x[index] = self.apply(x[index])
        y[index] = self.backdoor_labels(y[index])
        return x, y, index


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
        p, (channels, height, width) = self.params, self.shape
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


ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (BadNets, Blended)}


def _coerce(attack: str, field: dataclasses.Field, value):
    """Check a parameter against its default's type; ints are accepted where floats are expected."""
    kind = type(field.default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
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
    return cls(cls.params_type(**values), tuple(shape), num_classes, state)
