"""Grid specs: a YAML file validated into typed objects, expanded into one TrialSpec per trial."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from backdoor import ARCHS, ATTACKS, CODE_VERSION, DATASETS, TrainRecipe
from defenses import DEFENSES
from sau_kernel import MAX_SEED

DEFAULT_CLEAN_RATIO = 0.05  # the paper's
FIRST_CODE_VERSION = "1"  # the code version trial ids were defined at: it enters no id
# A grid past this many trials runs only with --yes: at the paper's 1.8 GPU-minutes per CIFAR-10 trial it is
# over a day of compute, more than a typo should start.
CONFIRM_TRIALS = 1_000
# Refused outright: every trial is expanded, validated and given a row and an MLflow run before and while it runs.
MAX_TRIALS = 1_000_000
MAX_SEARCH_SEED = 2**32 - 1  # numpy's seed range, which Optuna's samplers use
METRICS = ("acc_after", "asr_after", "ra_after", "der")


class SpecError(ValueError):
    """An invalid grid spec: one line, "<file>: <field>: <reason>"."""


def _bad(at: str, reason: str) -> PydanticCustomError:
    """A validation error at `at`, a path below the field being validated (see _describe)."""
    return PydanticCustomError("spec", "{at}: {reason}", {"at": at, "reason": reason})


# Built once per type and dataclass: building each takes about a millisecond, and a grid of a thousand trials
# validates tens of thousands of values.
_adapter = functools.cache(TypeAdapter)
_hints = functools.cache(get_type_hints)


def _typed(kind: type, value, at: str):
    """`value` as a `kind`; numbers are converted so that `lr: 1` and `lr: 1.0` give one trial id."""
    try:
        return _adapter(kind).validate_python(value)
    except ValidationError as e:
        raise _bad(at, f"{e.errors()[0]['msg']} (got {value!r})") from None


def _fill(cls: type, values: dict, what: str) -> dict:
    """`values` as keyword arguments of the dataclass `cls`, checked by constructing it; all fields."""
    types = _hints(cls)
    for key in values:
        if key not in types:
            raise _bad(key, f"unknown {what} (known: {', '.join(types)})")
    kwargs = {key: _typed(types[key], value, key) for key, value in values.items()}
    try:
        return asdict(cls(**kwargs))
    except ValueError as e:  # the project's "field: reason" messages (RecipeError says "training.field")
        head, _, reason = str(e).partition(": ")
        raise _bad(head.rpartition(".")[2], reason) from None


def _param_types(defense: str) -> dict[str, type]:
    """The settings of a defense in a grid: its parameters but seed, plus clean_ratio if it uses clean data."""
    cls = DEFENSES[defense]
    types = {name: kind for name, kind in _hints(cls.params_type).items() if name != "seed"}
    return types if cls.per_model else {**types, "clean_ratio": float}


def _param_value(defense: str, key: str, value, at: str | None = None):
    types = _param_types(defense)
    if not types:
        raise _bad(key, f"{defense} takes no parameters")
    if key not in types:
        raise _bad(key, f"unknown {defense.upper()} field (known: {', '.join(types)}; "
                        "seed comes from seeds)")
    return _typed(types[key], value, at or key)


def _combo(defense: str, values: dict) -> tuple[dict, float | None]:
    """One point of a defense's axes -> (every parameter but seed, clean_ratio); validated."""
    values = {key: _param_value(defense, key, value) for key, value in values.items()}
    cls = DEFENSES[defense]
    if cls.per_model:
        return {}, None
    clean_ratio = values.pop("clean_ratio", DEFAULT_CLEAN_RATIO)
    if not 0 < clean_ratio <= 1:
        raise _bad("clean_ratio", f"must be in (0, 1], got {clean_ratio}")
    seeded = "seed" in _hints(cls.params_type)
    params = _fill(cls.params_type, {**values, **({"seed": 0} if seeded else {})}, f"{defense.upper()} field")
    params.pop("seed", None)  # each trial sets its own
    return params, clean_ratio


def _no_repeats(items: list, at: str = "") -> list:
    for i, item in enumerate(items):
        if item in items[:i]:
            raise _bad(f"{at}[{i}]", f"same as item {items.index(item)}")
    return items


def _axes(defense: str, values: dict) -> dict:
    """A defense's settings, each a value or a list of values (an axis), typed; every combination valid."""
    typed = {}
    for key, value in values.items():
        if value == []:
            raise _bad(key, "empty list")
        typed[key] = (_no_repeats([_param_value(defense, key, v) for v in value], key) if isinstance(value, list)
                      else _param_value(defense, key, value))
    _check_size(typed)
    for point in _points(typed):
        _combo(defense, point)
    return typed


def _axes_size(axes: dict) -> int:
    return math.prod(len(v) for v in axes.values() if isinstance(v, list))


def _check_size(axes: dict) -> None:
    """Refuses axes with more combinations than a sweep holds, before they are enumerated."""
    if _axes_size(axes) > MAX_TRIALS:
        raise ValueError(f"the axes make {_axes_size(axes):,} combinations, more than the {MAX_TRIALS:,} "
                         "trials a sweep holds")


def _non_finite(data, at: str = "") -> tuple[str, float] | None:
    """The path and value of the first inf or nan in parsed YAML, or None."""
    if isinstance(data, float) and not math.isfinite(data):
        return at, data
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = _non_finite(value, f"{at}[{key}]" if isinstance(key, int) else f"{at}.{key}".lstrip("."))
        if found is not None:
            return found
    return None


def _points(axes: dict) -> list[dict]:
    """The cartesian product of the list-valued (axis) entries, in key order."""
    lists = [v if isinstance(v, list) else [v] for v in axes.values()]
    return [dict(zip(axes, point)) for point in itertools.product(*lists)]


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    root: str | None = None
    download: bool = False

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        # Only the name here: whether the data is there is found out when it is loaded.
        if name not in DATASETS and not (name.startswith("npz:") and len(name) > 4):
            raise ValueError(f"unknown dataset {name!r} (expected npz:PATH or one of {', '.join(DATASETS)})")
        return name

    @model_validator(mode="after")
    def _root_given(self) -> DatasetSpec:
        # digits ships with scikit-learn; every other named data set is read from under root.
        if self.name in DATASETS and self.name != "digits" and self.root is None:
            raise _bad("root", f"required for {self.name} (the directory that holds or receives the data)")
        return self


def _named_entry(data: dict, registry, kind: str) -> tuple[dict, str, dict]:
    """A registry entry written {name, params: {...}} or {name, key: value, ...}: its other keys (the name among
    them, and any stray key for the model to refuse), its name and its parameters."""
    data = dict(data)
    params = data.pop("params") if "params" in data else {k: data.pop(k) for k in list(data) if k != "name"}
    name = data.get("name")
    if not isinstance(name, str) or name not in registry:  # a list or mapping as a name is not hashable
        raise _bad("name", "required" if name is None else f"unknown {kind} {name!r} (known: {', '.join(registry)})")
    if not isinstance(params, dict):
        raise _bad("params", f"expected a mapping (got {params!r})")
    return data, name, params


class AttackSpec(BaseModel):
    """An attack's name and all of its parameters (defaults filled in). YAML: {name: blended, alpha: 0.2}."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    params: dict[str, Any]

    @model_validator(mode="before")
    @classmethod
    def _filled(cls, data):
        # Ranges that depend on the data (patch size, target class) are checked when the attack is built.
        if not isinstance(data, dict):
            return data
        data, name, params = _named_entry(data, ATTACKS, "attack")
        return {**data, "params": _fill(ATTACKS[name].params_type, params, f"parameter of {name}")}


class DefenseSpec(BaseModel):
    """A defense and its own axes. YAML: `ft` or {name: ft, lr: [1.0e-4, 1.0e-3]}; the grid's `sau:` section
    adds the keys that are parameters of this defense (see GridSpec.defense_axes)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    params: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _typed_axes(cls, data):
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, dict):
            return data
        data, name, params = _named_entry(data, DEFENSES, "defense")
        return {**data, "params": _axes(name, params)}


class ParamRange(BaseModel):
    """A search dimension: low/high (ints for int fields: an integer distribution) or choices."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_form(self) -> ParamRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log:
                raise _bad("choices", "give either choices or low/high/log, not both")
            _no_repeats(self.choices, "choices")
        elif self.low is None or self.high is None:
            raise _bad("low" if self.low is None else "high", "required (or give choices)")
        elif not self.low < self.high:
            raise _bad("low", f"must be < high, got {self.low} >= {self.high}")
        elif self.log and self.low <= 0:
            raise _bad("low", f"must be > 0 with log: true, got {self.low}")
        return self


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    metric: Literal[METRICS]
    mode: Literal["max", "min"]


class SchedulerSpec(BaseModel):
    """Early stopping of hopeless trials: Ray Tune's ASHA on the `round` attribute and the first objective.
    A trial is compared at rounds grace_rounds * reduction_factor**k, on its latest evaluation; both must make
    those rounds evaluation rounds (multiples of eval_every), so that it is compared on what it reached then."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["asha"]
    grace_rounds: int = Field(ge=1)
    reduction_factor: int = Field(3, ge=2)  # ASHA's usual 3: a third of the trials go on at each rung


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    num_samples: int = Field(ge=1, le=MAX_TRIALS)
    max_concurrent: int = Field(2, ge=1)
    sampler: Literal["tpe", "random", "nsga2", "gp"] = "tpe"
    seed: int = Field(0, ge=0, le=MAX_SEARCH_SEED)
    defense: str = "sau"  # the grid's one defense (GridSpec fills it in from `defenses`)
    space: dict[str, ParamRange] = Field(min_length=1)
    objectives: list[Objective] = Field(min_length=1, max_length=2)
    scheduler: SchedulerSpec | None = None

    @field_validator("defense")
    @classmethod
    def _searchable(cls, defense: str) -> str:
        if defense not in DEFENSES or DEFENSES[defense].per_model:
            raise ValueError(f"cannot search {defense!r}: it has no parameters")
        return defense

    @field_validator("space")
    @classmethod
    def _defense_fields(cls, space: dict[str, ParamRange], info) -> dict[str, ParamRange]:
        defense = info.data.get("defense", "sau")
        typed = {}
        for field, dim in space.items():
            # Values take the field's type: an int field's low/high become ints (an integer distribution).
            if dim.choices is None:
                update = {key: _param_value(defense, field, getattr(dim, key), f"{field}.{key}")
                          for key in ("low", "high")}
            else:
                update = {"choices": [_param_value(defense, field, v, f"{field}.choices") for v in dim.choices]}
            dim = dim.model_copy(update=update)
            for value in dim.choices or (dim.low, dim.high):
                _combo(defense, {field: value})
            typed[field] = dim
        return typed

    @field_validator("objectives")
    @classmethod
    def _distinct(cls, objectives: list[Objective]) -> list[Objective]:
        _no_repeats([o.metric for o in objectives])
        return objectives


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)

    @field_validator("gpu")
    @classmethod
    def _packs(cls, gpu: float) -> float:
        # Fractions that divide 1, so that that many trials fill a GPU exactly.
        if (0 < gpu < 1 and abs(1 / gpu - round(1 / gpu)) > 1e-9) or (gpu > 1 and gpu != int(gpu)):
            raise ValueError(f"must be an integer or 1/n (0.5, 0.25, 0.2, 0.125, ...), got {gpu}")
        return gpu


class GridSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    dataset: DatasetSpec
    attacks: list[AttackSpec] = Field(min_length=1)
    archs: list[str] = Field(min_length=1)
    attack_training: dict[str, Any] = Field({}, validate_default=True)
    sau: dict[str, Any] = {}
    defenses: list[DefenseSpec] = Field([DefenseSpec(name="sau")], min_length=1)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field([0], min_length=1)
    eval_every: int = Field(10, ge=1)
    resources: Resources = Resources()
    storage: str = Field(default_factory=lambda data: f"runs/{data['name']}")
    tracking_uri: str | None = None
    search: SearchSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, data):
        # Checked before the fields: inf or nan anywhere (a trigger parameter, a search bound) gives a result
        # computed from nothing, and fields that reject them would name the type rather than the value.
        at = _non_finite(data)
        if at is not None:
            raise _bad(at[0], f"must be a finite number (got {at[1]})")
        return data

    @property
    def trial_count(self) -> int:
        """How many trials the grid expands to (a search: its samples), without expanding it."""
        if self.search is not None:
            return self.search.num_samples
        per_model = sum(_axes_size(axes) for _, axes in self.defense_axes())
        return len(self.attacks) * len(self.archs) * len(self.seeds) * per_model

    @model_validator(mode="after")
    def _bounded(self) -> GridSpec:
        if self.trial_count > MAX_TRIALS:
            raise _bad("grid", f"expands to {self.trial_count:,} trials, more than the {MAX_TRIALS:,} a sweep holds")
        return self

    @field_validator("attacks")
    @classmethod
    def _distinct_attacks(cls, attacks: list[AttackSpec]) -> list[AttackSpec]:
        return _no_repeats(attacks)

    @field_validator("archs")
    @classmethod
    def _known_archs(cls, archs: list[str]) -> list[str]:
        for i, arch in enumerate(archs):
            if arch not in ARCHS:
                raise _bad(f"[{i}]", f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
        return _no_repeats(archs)

    @field_validator("attack_training")
    @classmethod
    def _recipe(cls, values: dict) -> dict:
        return _fill(TrainRecipe, values, "training field")

    @field_validator("seeds", mode="before")
    @classmethod
    def _listed(cls, seeds):
        return [seeds] if isinstance(seeds, int) else seeds

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        return _no_repeats(seeds)

    @field_validator("sau")
    @classmethod
    def _sau_axes(cls, sau: dict) -> dict:
        return _axes("sau", sau)

    @field_validator("defenses")
    @classmethod
    def _distinct_defenses(cls, defenses: list[DefenseSpec]) -> list[DefenseSpec]:
        return _no_repeats(defenses)

    @model_validator(mode="before")
    @classmethod
    def _search_defense(cls, data):
        """A search tunes the grid's one defense."""
        if isinstance(data, dict) and isinstance(data.get("search"), dict) and isinstance(data.get("defenses"), list):
            if len(data["defenses"]) != 1:
                raise _bad("search", f"runs on one defense; defenses has {len(data['defenses'])}")
            entry = data["defenses"][0]
            data = {**data, "search": {"defense": entry.get("name") if isinstance(entry, dict) else entry,
                                       **data["search"]}}
        return data

    @model_validator(mode="after")
    def _defense_points(self) -> GridSpec:
        for i, (name, axes) in enumerate(self.defense_axes()):
            try:
                _check_size(axes)  # the `sau:` section's axes and the entry's together
                for point in _points(axes):  # every combination must make a valid configuration
                    _combo(name, point)
            except PydanticCustomError as e:
                raise _bad(f"defenses[{i}].{e.context['at']}", e.context["reason"]) from None
            except ValueError as e:
                raise _bad(f"defenses[{i}]", str(e)) from None
        return self

    @model_validator(mode="after")
    def _search_without_axes(self) -> GridSpec:
        if self.search is not None:
            if [d.name for d in self.defenses] != [self.search.defense]:
                raise _bad("search.defense", f"must be the grid's one defense, {self.defenses[0].name}")
            name, settings = self.defense_axes()[0]
            axes = {f"{name}.{k}": v for k, v in settings.items() if isinstance(v, list)}
            axes.update(attacks=self.attacks, archs=self.archs, seeds=self.seeds)
            for field, values in axes.items():
                if len(values) > 1:
                    raise _bad("search", f"cannot be combined with grid axes; {field} has {len(values)} values")
            scheduler, rounds = self.search.scheduler, _combo(name, settings)[0].get("rounds")
            if scheduler is not None and scheduler.grace_rounds % self.eval_every:
                raise _bad("search.scheduler.grace_rounds",
                           f"must be a multiple of eval_every ({self.eval_every}): trials are compared on "
                           "their evaluations")
            if scheduler is not None and scheduler.grace_rounds >= rounds:
                raise _bad("search.scheduler.grace_rounds", f"must be less than {name}.rounds ({rounds})")
        return self

    def defense_axes(self) -> list[tuple[str, dict]]:
        """Each defense with its axes: the `sau:` section's keys that are its settings (SAU: all of them;
        ft: its budget lr, rounds, batch_size, train_bn, and clean_ratio; none: nothing), then its own entry's."""
        axes = []
        for entry in self.defenses:
            settings = _param_types(entry.name)
            axes.append((entry.name, {**{k: v for k, v in self.sau.items() if k in settings}, **entry.params}))
        return axes


def _describe(error: ValidationError) -> str:
    """The first error as "dotted.field[1].path: reason"."""
    first = error.errors(include_url=False)[0]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
    reason = {"extra_forbidden": "unknown field", "missing": "required"}.get(first["type"], first["msg"])
    if first["type"] == "value_error":  # a validator's own ValueError, without pydantic's "Value error, "
        reason = str(first["ctx"]["error"])
    elif first["type"] == "spec":
        at, reason = first["ctx"]["at"], first["ctx"]["reason"]
        path += at if at.startswith("[") else f".{at}"
    return f"{path.lstrip('.')}: {reason}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (list, dict)):
                    continue  # unhashable: the base class reports it
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {key!r} (first given on line {first[key].line + 1})", key_node.start_mark)
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_grid(path) -> GridSpec:
    """Read and validate a grid YAML file; any problem is a one-line SpecError. Writes nothing."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except OSError as e:
        raise SpecError(f"{path}: {(e.strerror or 'cannot read').lower()}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{path}: {where}invalid YAML ({' '.join(problem.split())})") from None
    except RecursionError:
        raise SpecError(f"{path}: invalid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of grid fields, got {type(data).__name__}")
    try:
        return GridSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{path}: {_describe(e)}") from None
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply") from None


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrialSpec:
    grid: str
    dataset: DatasetSpec
    attack: AttackSpec
    arch: str
    training: dict  # every TrainRecipe field
    seed: int
    clean_ratio: float | None  # None for a defense that uses no clean data
    defense: str
    params: dict  # every parameter of the defense but seed
    eval_every: int

    @property
    def trial_id(self) -> str:
        """Hash of what determines the result: not the grid name, nor where the data lives (root).

        The rule (docs/design.md, "Trial identity"): the model's spec and seed; for a per-model defense its
        name; else clean_ratio, eval_every and the defense's parameters, those outside its `id_fields` only when
        they differ from their default; SAU's under the key "sau", any other as {"name", "params"} under
        "defense"; the code version when it is not FIRST_CODE_VERSION."""
        content = {"dataset": self.dataset.name, "attack": self.attack.model_dump(), "arch": self.arch,
                   "training": self.training, "seed": self.seed}
        defense = DEFENSES[self.defense]
        if defense.per_model:
            content["defense"] = self.defense
        else:
            config, defaults = asdict(self.config()), asdict(defense.params_type())
            params = {k: v for k, v in config.items() if k in defense.id_fields or v != defaults[k]}
            content.update(clean_ratio=self.clean_ratio, eval_every=self.eval_every)
            content.update({"sau": params} if self.defense == "sau" else
                           {"defense": {"name": self.defense, "params": params}})
        if CODE_VERSION != FIRST_CODE_VERSION:
            content["code_version"] = CODE_VERSION
        return _digest(content)

    @property
    def model_key(self) -> str:
        """Hash of what determines the backdoored model, shared by every defense trial on it."""
        return _digest({"dataset": self.dataset.name, "attack": self.attack.model_dump(), "arch": self.arch,
                        "training": self.training, "seed": self.seed, "code_version": CODE_VERSION})

    def config(self):
        """The defense's parameters, with this trial's seed."""
        params_type = DEFENSES[self.defense].params_type
        return params_type(**self.params, **({"seed": self.seed} if "seed" in _hints(params_type) else {}))

    def with_params(self, **changes) -> TrialSpec:
        """This trial with some parameters (or clean_ratio) changed, e.g. to values a searcher sampled."""
        try:
            params, clean_ratio = _combo(self.defense, {**self.params, "clean_ratio": self.clean_ratio, **changes})
        except PydanticCustomError as e:
            raise SpecError(f"{self.defense}.{e.context['at']}: {e.context['reason']}") from None
        return replace(self, clean_ratio=clean_ratio, params=params)

    def flat(self) -> dict[str, str | int | float | bool]:
        """Scalar columns for a result row or MLflow params; a defense's parameters are `<defense>.<field>`."""
        return {"dataset": self.dataset.name, "attack": self.attack.name,
                **{f"attack.{k}": v for k, v in self.attack.params.items()}, "arch": self.arch,
                **{f"train.{k}": v for k, v in self.training.items()}, "seed": self.seed, "defense": self.defense,
                **({} if self.clean_ratio is None else {"clean_ratio": self.clean_ratio}),
                **{f"{self.defense}.{k}": v for k, v in self.params.items()}, "eval_every": self.eval_every}


def expand(grid: GridSpec) -> list[TrialSpec]:
    """One TrialSpec per point of attacks × archs × seeds × defenses × each defense's axes (in YAML order)."""
    trials = []
    for attack, arch, seed in itertools.product(grid.attacks, grid.archs, grid.seeds):
        for defense, axes in grid.defense_axes():
            for point in _points(axes):
                params, clean_ratio = _combo(defense, point)
                trials.append(TrialSpec(grid=grid.name, dataset=grid.dataset, attack=attack, arch=arch,
                                        training=grid.attack_training, seed=seed, clean_ratio=clean_ratio,
                                        defense=defense, params=params, eval_every=grid.eval_every))
    return trials
