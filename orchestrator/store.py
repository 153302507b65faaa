"""Stage 1, the model store: every distinct backdoored model of a sweep, trained once as a Ray task."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import ray

from backdoor import TrainRecipe, load_dataset, make_attack, train_record

from .spec import Resources, TrialSpec


class StoreError(ValueError):
    """A backdoored model that could not be trained; one line naming the model and the cause."""


def train_model(spec: TrialSpec, directory: Path) -> None:
    """Train the backdoored model `spec` needs and save it as a model record in `directory` (atomically)."""
    data = load_dataset(spec.dataset.name, root=spec.dataset.root, download=spec.dataset.download)
    attack = make_attack(spec.attack.name, spec.attack.params, data.shape, data.num_classes)
    train_record(data, attack, spec.arch, TrainRecipe(**spec.training), spec.seed, directory)


def ensure_models(specs: list[TrialSpec], models_dir: Path, resources: Resources,
                  out: Callable[[str], None] = print) -> None:
    """Train the models of `specs` that models_dir/<model_key> does not hold yet, in parallel on Ray.

    Waits for all of them; if any failed, raises StoreError for the first (the others are kept)."""
    missing = {spec.model_key: spec for spec in specs if not (models_dir / spec.model_key).is_dir()}
    if missing:
        out(f"stage 1: training {len(missing)} backdoored models")
    task = ray.remote(num_cpus=resources.cpu, num_gpus=resources.gpu)(train_model)
    pending = {key: task.remote(spec, models_dir / key) for key, spec in missing.items()}
    failures = []
    for key, ref in pending.items():
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as error:
            spec = missing[key]
            failures.append(f"{key} ({spec.attack.name}, {spec.arch}, seed {spec.seed}): {error.cause!r}")
    if failures:
        raise StoreError(f"stage 1: training model {failures[0]}"
                         + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""))
