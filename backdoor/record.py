"""Model records: a directory with model.safetensors, trigger.safetensors and record.json (with checksums)."""

import dataclasses
import hashlib
import json
import math
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
# Ranges a record.json must keep before anything is built from it (a forged num_classes would otherwise
# allocate a classifier of that many outputs): ImageNet-21k has 21,841 classes; the image sizes the
# architectures take are far below 4096 pixels a side; images have 1 to 4 channels.
MAX_CLASSES = 100_000
MAX_SIDE = 4096


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
    _check_ranges(path, values)
    record = ModelRecord(**values | {name: tuple(values[name]) for name in ("shape", "mean", "std")})
    return record, meta["sha256"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_ranges(path: Path, meta: dict) -> None:
    """Every field of a record.json in its range, so a forged or damaged one fails here in one line."""
    shape, mean, std = meta["shape"], meta["mean"], meta["std"]
    shape_ok = (len(shape) == 3 and all(_is_int(s) for s in shape) and 1 <= shape[0] <= 4
                and all(1 <= s <= MAX_SIDE for s in shape[1:]))
    channels = shape[0] if shape_ok else None
    checks = [
        ("arch", isinstance(meta["arch"], str), "must be a string"),
        ("num_classes", _is_int(meta["num_classes"]) and 2 <= meta["num_classes"] <= MAX_CLASSES,
         f"must be an integer in [2, {MAX_CLASSES}]"),
        ("shape", shape_ok, f"must be [channels 1-4, height, width], sides in [1, {MAX_SIDE}]"),
        ("mean", len(mean) == channels and all(_is_number(m) for m in mean), "must be one finite number per channel"),
        ("std", len(std) == channels and all(_is_number(v) and v > 0 for v in std),
         "must be one finite number > 0 per channel"),
        ("dataset", isinstance(meta["dataset"], str), "must be a string"),
        ("attack", isinstance(meta["attack"], str), "must be a string"),
        ("attack_params", isinstance(meta["attack_params"], dict), "must be an object"),
        ("seed", _is_int(meta["seed"]) and meta["seed"] >= 0, "must be an integer >= 0"),
        ("recipe", isinstance(meta["recipe"], dict), "must be an object"),
        ("metrics", isinstance(meta["metrics"], dict) and all(_is_number(v) and 0 <= v <= 1
                                                               for v in meta["metrics"].values()),
         "must map names to numbers in [0, 1]"),
    ]
    for name, ok, reason in checks:
        if not ok:
            raise RecordError(f"{path}: {name}: {reason} (got {json.dumps(meta[name])[:80]})")


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
