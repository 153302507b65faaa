"""Stage 1, the model store: every distinct backdoored model of a sweep, trained once as a Ray task and kept
as a model record under models/<model_key>/ in the sweep's storage, where every trial reads it."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Callable

import ray

from backdoor import TrainRecipe, load_dataset, make_attack, train_record
from backdoor.record import FILES

from .spec import Resources, TrialSpec
from .storage import Storage, cache_home

# record.json goes last: a record whose record.json is there is complete.
RECORD_FILES = (*FILES, "record.json")


class StoreError(ValueError):
    """A backdoored model that could not be trained; one line naming the model and the cause."""


def has_record(record: Storage) -> bool:
    return record.exists("record.json")


def put_record(directory: Path, record: Storage) -> None:
    """Copy the model record in the local `directory` to `record`, record.json last."""
    for name in RECORD_FILES:
        record.write(name, (directory / name).read_bytes())


def fetch_record(record: Storage) -> Path:
    """A local directory holding `record`: the record itself on a local storage, else this machine's copy
    (cache/models/<model_key>), whose files are downloaded where they are missing or differ from the
    checksums of the stored record.json. load_record verifies them again."""
    if record.local_path is not None:
        return record.local_path
    meta = record.read("record.json")
    if meta is None:
        raise FileNotFoundError(f"{record.location('record.json')}: no such model record")
    checksums = json.loads(meta).get("sha256", {})
    copy = Storage(cache_home() / "models" / Path(record.root).name)
    for name in FILES:
        local = copy.local_path / name
        if not local.is_file() or hashlib.sha256(local.read_bytes()).hexdigest() != checksums.get(name):
            copy.write(name, record.read(name) or b"")
    copy.write("record.json", meta)
    return copy.local_path


def train_model(spec: TrialSpec, record: Storage) -> None:
    """Train the backdoored model `spec` needs and store it as a model record in `record`."""
    data = load_dataset(spec.dataset.name, root=spec.dataset.root, download=spec.dataset.download)
    attack = make_attack(spec.attack.name, spec.attack.params, data.shape, data.num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        train_record(data, attack, spec.arch, TrainRecipe(**spec.training), spec.seed, Path(tmp) / "record")
        put_record(Path(tmp) / "record", record)


def ensure_models(specs: list[TrialSpec], models: Storage, resources: Resources,
                  out: Callable[[str], None] = print) -> None:
    """Train the models of `specs` that models/<model_key> does not hold yet, in parallel on Ray.

    Waits for all of them; if any failed, raises StoreError for the first (the others are kept)."""
    missing = {spec.model_key: spec for spec in specs if not has_record(models / spec.model_key)}
    if missing:
        out(f"stage 1: training {len(missing)} backdoored models")
    task = ray.remote(num_cpus=resources.cpu, num_gpus=resources.gpu)(train_model)
    pending = {key: task.remote(spec, models / key) for key, spec in missing.items()}
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
