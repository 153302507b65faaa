"""Model records: a directory with model.safetensors, trigger.safetensors and record.json (with checksums)."""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .attacks import Attack, make_attack
from .models import build_model
from .tensorfile import decode, encode

FORMAT = "sau-model-record/1"
FILES = ("model.safetensors", "trigger.safetensors")


class RecordError(ValueError):
    """A directory that is not a valid model record; the message names the path and the problem."""


@dataclass(frozen=True)
class ModelRecord:
    arch: str
    num_classes: int
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str
    attack: str
    attack_params: dict
    seed: int
    recipe: dict
    metrics: dict[str, float]


def save_record(directory, model: nn.Module, attack: Attack, record: ModelRecord) -> None:
    """Write the record to a temporary directory beside `directory`, then rename it into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a record is shared by every trial that reads it
        blobs = dict(zip(FILES, (encode(model.state_dict()), encode(attack.state_dict()))))
        for name, blob in blobs.items():
            (tmp / name).write_bytes(blob)
        meta = dataclasses.asdict(record) | {
            "format": FORMAT, "sha256": {name: hashlib.sha256(blob).hexdigest() for name, blob in blobs.items()}}
        (tmp / "record.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            # Directories cannot be replaced atomically: move the old one aside first.
            old = tmp.with_name(tmp.name + ".old")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_meta(directory: Path) -> tuple[ModelRecord, dict]:
    path = directory / "record.json"
    if not path.is_file():
        raise RecordError(f"{directory}: not a model record (no record.json)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{path}: unreadable ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RecordError(f"{path}: format: expected {FORMAT!r}")
    names = [field.name for field in dataclasses.fields(ModelRecord)]
    missing = [name for name in names + ["sha256"] if name not in meta]
    if missing:
        raise RecordError(f"{path}: missing fields {', '.join(missing)}")
    if not isinstance(meta["sha256"], dict) or not all(isinstance(meta[n], list) for n in ("shape", "mean", "std")):
        raise RecordError(f"{path}: sha256 must be an object and shape, mean, std lists")
    values = {name: meta[name] for name in names}
    record = ModelRecord(**values | {name: tuple(values[name]) for name in ("shape", "mean", "std")})
    return record, meta["sha256"]


def _read_tensors(directory: Path, name: str, expected: str) -> dict:
    path = directory / name
    try:
        blob = path.read_bytes()
    except OSError as error:
        raise RecordError(f"{path}: unreadable ({error.strerror})") from None
    if hashlib.sha256(blob).hexdigest() != expected:
        raise RecordError(f"{path}: sha256 does not match record.json (file changed or corrupt)")
    try:
        return decode(blob)
    except ValueError as error:
        raise RecordError(f"{path}: {error}") from None


def load_record(directory) -> tuple[nn.Module, Attack, ModelRecord]:
    """Verify and load a record: the model (CPU, eval mode), its attack with the stored trigger, the metadata."""
    directory = Path(directory)
    record, checksums = _read_meta(directory)
    weights, trigger = (_read_tensors(directory, name, checksums.get(name)) for name in FILES)
    try:
        model = build_model(record.arch, record.num_classes, record.shape[0], record.mean, record.std)
        attack = make_attack(record.attack, record.attack_params, record.shape, record.num_classes, state=trigger)
    except (ValueError, TypeError, IndexError) as error:
        raise RecordError(f"{directory}: {error}") from None
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    if {key: tuple(value.shape) for key, value in weights.items()} != shapes:
        raise RecordError(f"{directory / FILES[0]}: weights do not fit {record.arch} "
                          f"({record.num_classes} classes, {record.shape[0]} channels)")
    model.load_state_dict(weights, strict=True)
    return model.eval(), attack, record
