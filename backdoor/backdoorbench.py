"""Import a BackdoorBench attack result (attack_result.pt and its bd_test_dataset/ PNGs) as a model record."""

import dataclasses
import operator
import pickle
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import nn

from .attacks import AttackError, ImportedAttack, make_attack
from .data import CIFAR10_NORM, CIFAR100_NORM, GTSRB_NORM, TINY_IMAGENET_NORM, ImageData, load_dataset
from .metrics import EvalSets, eval_sets, evaluate
from .models import build_model
from .record import ModelRecord, save_record

RESULT_FILE = "attack_result.pt"
PNG_FOLDER = "bd_test_dataset"
MODEL_NAMES = ("preactresnet18",)  # BackdoorBench's names that are also this project's architectures
# BackdoorBench's `clean_data` -> this project's data set name and BackdoorBench's normalisation.
DATASETS = {"cifar10": ("cifar10", CIFAR10_NORM), "cifar100": ("cifar100", CIFAR100_NORM),
            "gtsrb": ("gtsrb", GTSRB_NORM), "tiny": ("tiny-imagenet", TINY_IMAGENET_NORM)}
NUMERIC_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                  "float16", "float32", "float64")


class BackdoorBenchError(ValueError):
    """A BackdoorBench record that cannot be imported; the message names the file and the reason."""


def _numpy_globals() -> list:
    """What torch's weights-only unpickler must let through for plain numeric NumPy arrays and scalars."""
    # The functions NumPy pickles arrays and scalars with; NumPy 1.x files name them numpy.core.multiarray.*,
    # NumPy 2 files numpy._core.multiarray.*, so both names map to this NumPy's functions.
    functions = [np.empty(0).__reduce__()[0], np.int64(0).__reduce__()[0]]
    aliases = [(f, f"{module}.{f.__name__}") for f in functions
               for module in ("numpy.core.multiarray", "numpy._core.multiarray")]
    # A dtype is rebuilt as an instance of its own class (numpy.dtypes.Int64DType, ...), not of numpy.dtype.
    return [np.ndarray, np.dtype, *aliases, *{type(np.dtype(name)) for name in NUMERIC_DTYPES}]


def read_attack_result(path: Path) -> object:
    """torch.load(weights_only=True) that admits tensors, plain containers and numeric NumPy data, nothing else."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            result = None if unsafe else torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise BackdoorBenchError(f"{path}: refused: {_unpickler_reason(error)}") from None
    except (RuntimeError, ValueError, EOFError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BackdoorBenchError(f"{path}: not a readable torch.save file ({reason})") from None
    if unsafe:
        raise BackdoorBenchError(f"{path}: refused: it holds the global {unsafe[0]}, which loading could run "
                                 f"(only tensors and NumPy arrays are read)")
    return result


def _unpickler_reason(error: Exception) -> str:
    # torch wraps the unpickler's own message in paragraphs of advice; keep the message.
    paragraphs = [p.strip() for p in str(error).split("\n\n") if p.strip()]
    reason = next((p for p in reversed(paragraphs) if not p.startswith("Check the documentation")), str(error))
    return reason.splitlines()[0]


def _field(result: dict, path: Path, key: str, *kinds: type):
    value = result.get(key)
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise BackdoorBenchError(f"{path}: {key}: expected {' or '.join(kind.__name__ for kind in kinds)}, "
                                 f"got {type(value).__name__}")
    return value


def _shape(path: Path, img_size) -> tuple[int, int, int]:
    """BackdoorBench's img_size (H, W, C) -> (C, H, W)."""
    if len(img_size) != 3 or not all(isinstance(s, int) and s > 0 for s in img_size):
        raise BackdoorBenchError(f"{path}: img_size: expected (height, width, channels), got {img_size!r}")
    height, width, channels = img_size
    return channels, height, width


def _load_weights(path: Path, net: nn.Module, state: dict, description: str) -> None:
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise BackdoorBenchError(f"{path}: model: expected a state dict of named tensors")
    weights = {key.removeprefix("module."): value for key, value in state.items()}  # DataParallel's prefix
    expected = {key: tuple(value.shape) for key, value in net.state_dict().items()}
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    wrong = [key for key in expected if key in weights and tuple(weights[key].shape) != expected[key]]
    if missing or unexpected or wrong:
        first = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                 f"{wrong[0]} has shape {tuple(weights[wrong[0]].shape)}, expected {expected[wrong[0]]}")
        raise BackdoorBenchError(f"{path}: model: weights do not fit {description} ({first}; {len(missing)} "
                                 f"missing, {len(unexpected)} unexpected, {len(wrong)} of another shape)")
    net.load_state_dict(weights)


def _png_path(record_dir: Path, text: str) -> Path:
    """The PNG under RECORD_DIR/bd_test_dataset/ that BackdoorBench's path (relative or absolute) names."""
    parts = PurePosixPath(text.replace("\\", "/")).parts
    rest = parts[parts.index(PNG_FOLDER) + 1:] if PNG_FOLDER in parts else ()
    if not rest or ".." in rest:
        raise ValueError(f"path {text!r} does not lie under {PNG_FOLDER}/")
    return record_dir.joinpath(PNG_FOLDER, *rest)


def _read_rgb(png: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 3×H×W pixels (every data set BackdoorBench records come from here is RGB)."""
    from PIL import Image

    try:
        with Image.open(png) as image:
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    except OSError as error:
        raise BackdoorBenchError(f"{png}: not a readable image ({error})".splitlines()[0]) from None
    if tuple(pixels.shape) != shape:
        raise BackdoorBenchError(f"{png}: image of shape {tuple(pixels.shape)}, expected {shape} (img_size)")
    return pixels


def _poisoned_test_set(record_dir: Path, path: Path, bd_test: dict,
                       shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """bd_test's data_dict {original index: {"path", "other_info": [bd_label, label]}} and its PNGs, by index."""
    container = bd_test.get("bd_data_container")
    entries = container.get("data_dict") if isinstance(container, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise BackdoorBenchError(f"{path}: bd_test: bd_data_container.data_dict: missing or empty")
    rows = []
    for key, entry in entries.items():
        try:
            bd_label, label = (operator.index(v) for v in entry["other_info"])
            rows.append((operator.index(key), bd_label, label, _png_path(record_dir, entry["path"])))
        except (TypeError, KeyError, ValueError, AttributeError) as error:
            raise BackdoorBenchError(f"{path}: bd_test: data_dict[{key!r}]: expected {{'path': str, "
                                     f"'other_info': [bd_label, label]}} ({error})") from None
    rows.sort()
    missing = next((png for *_, png in rows if not png.is_file()), None)
    if missing is not None:
        raise BackdoorBenchError(f"{missing}: missing (a poisoned test image that {path} lists)")
    images = [_read_rgb(png, shape) for *_, png in rows]
    index, y_bd, y_true, _ = zip(*rows)
    return {"x_bd": torch.stack(images), "y_bd": torch.tensor(y_bd), "y_true": torch.tensor(y_true),
            "index": torch.tensor(index)}


def _attack_params(path: Path, result: dict, state: dict[str, torch.Tensor], num_classes: int) -> dict:
    """The label rule the backdoor labels follow, and the training poison ratio where bd_train records it."""
    y_bd, y_true = state["y_bd"], state["y_true"]
    if (y_bd == y_bd[0]).all():
        params = {"target": int(y_bd[0]), "label_mode": "all2one"}
    elif torch.equal(y_bd, (y_true + 1) % num_classes):
        params = {"label_mode": "all2all"}
    else:
        raise BackdoorBenchError(f"{path}: bd_test: backdoor labels follow neither all2one (one target) nor "
                                 f"all2all ((label + 1) mod {num_classes})")
    bd_train = result.get("bd_train")
    indicator = bd_train.get("poison_indicator") if isinstance(bd_train, dict) else None
    if isinstance(indicator, np.ndarray) and indicator.size:
        params["poison_ratio"] = float((indicator == 1).mean())
    return params


def imported_metrics(model: nn.Module, attack: ImportedAttack, data: ImageData | None = None, *,
                     device=None) -> dict[str, float]:
    """ACC, ASR and RA when `data` supplies the clean test set; ASR and RA alone otherwise."""
    if data is not None:
        return dataclasses.asdict(evaluate(model, eval_sets(data, attack), device=device))
    x_bd, y_bd, y_true = (attack.state_dict()[key] for key in ("x_bd", "y_bd", "y_true"))
    # With an empty clean set evaluate's ACC is undefined, so it is left out.
    metrics = evaluate(model, EvalSets(x_bd[:0], y_true[:0], x_bd, y_bd, y_true), device=device)
    return {"asr": metrics.asr, "ra": metrics.ra}


def import_backdoorbench(record_dir, out, data_root=None, *, device=None) -> ModelRecord:
    """Read RECORD_DIR/attack_result.pt and its poisoned test PNGs; write them to `out` as a model record.

    With `data_root` the clean test set of the record's data set is loaded from there, checked against the
    poisoned images' indices and labels, and ACC is measured too. Nothing is written unless all of it succeeds.
    """
    record_dir = Path(record_dir)
    path = record_dir / RESULT_FILE
    if not path.is_file():
        raise BackdoorBenchError(f"{path}: missing (expected a BackdoorBench record folder)")
    result = read_attack_result(path)
    if not isinstance(result, dict):
        raise BackdoorBenchError(f"{path}: expected a dict, got {type(result).__name__}")
    model_name = _field(result, path, "model_name", str)
    if model_name not in MODEL_NAMES:
        raise BackdoorBenchError(f"{path}: model_name: {model_name!r} is not supported "
                                 f"(supported: {', '.join(MODEL_NAMES)})")
    clean_data = _field(result, path, "clean_data", str)
    if clean_data not in DATASETS:
        raise BackdoorBenchError(f"{path}: clean_data: {clean_data!r} is not supported "
                                 f"(supported: {', '.join(DATASETS)})")
    dataset, (mean, std) = DATASETS[clean_data]
    num_classes = _field(result, path, "num_classes", int)
    shape = _shape(path, _field(result, path, "img_size", list, tuple))
    if num_classes < 2 or shape[0] != len(mean):
        raise BackdoorBenchError(f"{path}: num_classes / img_size: {clean_data} needs >= 2 classes and "
                                 f"{len(mean)} channels, got {num_classes} and {shape[0]}")
    model = build_model(model_name, num_classes, shape[0], mean, std)
    _load_weights(path, model[1], _field(result, path, "model", dict),
                  f"{model_name} with {num_classes} classes and {shape[0]} channels")
    state = _poisoned_test_set(record_dir, path, _field(result, path, "bd_test", dict), shape)
    params = _attack_params(path, result, state, num_classes)
    try:
        attack = make_attack(ImportedAttack.name, params, shape, num_classes, state=state)
        data = None
        if data_root is not None:
            data = load_dataset(dataset, root=data_root)
            if data.shape != shape or data.num_classes != num_classes:
                raise BackdoorBenchError(f"{path}: {dataset} under {data_root} has images {data.shape} and "
                                         f"{data.num_classes} classes, the record {shape} and {num_classes}")
        metrics = imported_metrics(model.to(device or "cpu"), attack, data, device=device)
    except AttackError as error:
        raise BackdoorBenchError(f"{path}: {error}") from None
    # The training seed is not in the file: 0 is BackdoorBench's default.
    record = ModelRecord(arch=model_name, num_classes=num_classes, shape=shape, mean=mean, std=std,
                         dataset=dataset, attack=ImportedAttack.name, attack_params=dataclasses.asdict(attack.params),
                         seed=0, recipe={"source": "backdoorbench"}, metrics=metrics)
    save_record(out, model.cpu(), attack, record)
    return record
