"""Importing BackdoorBench attack results: a record folder built here in BackdoorBench's own format."""

import collections
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backdoor import ImageData, build_model, eval_sets, load_record, make_attack
from backdoor.attacks import AttackError
from backdoor.backdoorbench import BackdoorBenchError, import_backdoorbench, imported_metrics, read_attack_result
from backdoor.data import CIFAR10_NORM, DataError

REPO = Path(__file__).resolve().parents[1]
SHAPE = (3, 32, 32)
INDICES = [7, 3, 12, 20]  # original test-set indices, in data_dict's (unsorted) order
LABELS = [1, 2, 5, 9]  # their true labels; all2one to class 0 unless a test says otherwise


class EvilDict(collections.OrderedDict):
    """A dict subclass: loading it would mean importing and instantiating a class from this module."""


class RunsCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """A PreAct-ResNet18 state dict in BackdoorBench's naming whose model predicts class 0 for every image."""
    torch.manual_seed(0)
    model = build_model("preactresnet18", 10, 3, *CIFAR10_NORM)
    state = {key.removeprefix("1."): value for key, value in model.state_dict().items() if key.startswith("1.")}
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            value.copy_(torch.rand_like(value) + key.endswith("running_var"))  # non-default statistics
    state["linear.weight"].zero_()
    state["linear.bias"].copy_(torch.eye(10)[0])
    return state


def write_record(directory: Path, weights: dict, bd_labels: list[int] | None = None, **fields) -> Path:
    """A BackdoorBench run folder as save_attack_result leaves it: attack_result.pt and bd_test_dataset/ PNGs."""
    rng = np.random.default_rng(0)
    data_dict = {}
    for index, label, bd_label in zip(INDICES, LABELS, bd_labels or [0] * len(INDICES)):
        png = directory / "bd_test_dataset" / str(label) / f"{index}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(png)
        # BackdoorBench writes absolute paths; older records relative ones. Both appear here.
        prefix = "/home/someone/BackdoorBench" if index == 12 else "."
        data_dict[np.int64(index)] = {"path": f"{prefix}/record/run/bd_test_dataset/{label}/{index}.png",
                                      "other_info": [bd_label, label]}
    poison_indicator = np.zeros(30)
    poison_indicator[INDICES] = 1
    bd_test = {"bd_data_container": {"save_folder_path": "/home/someone/record/run/bd_test_dataset",
                                     "data_dict": data_dict, "save_file_format": ".png"},
               "getitem_all": True, "getitem_all_switch": False, "original_index_array": np.array(sorted(INDICES)),
               "poison_indicator": poison_indicator, "save_folder_path": "/home/someone/record/run/bd_test_dataset"}
    result = {"model_name": "preactresnet18", "num_classes": 10,
              "model": collections.OrderedDict(("module." + key, value) for key, value in weights.items()),
              "data_path": "./data/cifar10", "img_size": [32, 32, 3], "clean_data": "cifar10", "bd_train": None,
              "bd_test": bd_test} | fields
    torch.save(result, directory / "attack_result.pt")
    return directory


def png_pixels(directory: Path, index: int, label: int) -> torch.Tensor:
    with Image.open(directory / "bd_test_dataset" / str(label) / f"{index}.png") as image:
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def import_fails(directory: Path, out: Path, *fragments: str, error=BackdoorBenchError, data_root=None) -> None:
    """The import raises `error` with a one-line message holding every fragment, and writes nothing."""
    before = set(out.parent.iterdir())
    with pytest.raises(error) as caught:
        import_backdoorbench(directory, out, data_root=data_root)
    message = str(caught.value)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message
    assert set(out.parent.iterdir()) == before


def test_round_trip_keeps_the_weights_and_the_poisoned_test_images(tmp_path, weights):
    source = write_record(tmp_path / "run", weights)
    record = import_backdoorbench(source, tmp_path / "model")
    model, attack, loaded = load_record(tmp_path / "model")
    assert loaded == record
    assert (record.arch, record.dataset, record.shape, record.num_classes) == ("preactresnet18", "cifar10", SHAPE, 10)
    assert (record.mean, record.std) == CIFAR10_NORM
    assert record.attack == "imported"
    assert record.attack_params == {"target": 0, "poison_ratio": 0.1, "label_mode": "all2one"}
    state = model.state_dict()
    assert set(state) == {"0.mean", "0.std"} | {"1." + key for key in weights}
    assert all(torch.equal(state["1." + key], value) for key, value in weights.items())
    trigger = attack.state_dict()
    order = sorted(range(len(INDICES)), key=INDICES.__getitem__)
    assert trigger["index"].tolist() == sorted(INDICES)
    assert trigger["y_true"].tolist() == [LABELS[i] for i in order] and trigger["y_bd"].tolist() == [0] * 4
    expected = torch.stack([png_pixels(source, INDICES[i], LABELS[i]) for i in order])
    assert trigger["x_bd"].dtype == torch.uint8 and torch.equal(trigger["x_bd"], expected)
    assert record.metrics == {"asr": 1.0, "ra": 0.0}  # the model answers 0, the target, for every image


def test_all2all_labels_and_the_training_poison_ratio_come_from_the_record(tmp_path, weights):
    bd_train = {"poison_indicator": np.array([1, 0, 0, 0, 0, 0, 0, 1], dtype=np.int64)}
    source = write_record(tmp_path / "run", weights, bd_labels=[(y + 1) % 10 for y in LABELS], bd_train=bd_train)
    record = import_backdoorbench(source, tmp_path / "model")
    assert record.attack_params == {"target": 0, "poison_ratio": 0.25, "label_mode": "all2all"}
    assert record.metrics == {"asr": 0.25, "ra": 0.0}  # only label 9's backdoor label is 0


def test_clean_test_set_adds_acc_and_must_match_the_stored_indices(tmp_path, weights):
    source = write_record(tmp_path / "run", weights)
    import_backdoorbench(source, tmp_path / "model")
    model, attack, _ = load_record(tmp_path / "model")
    y_test = torch.arange(30) % 10
    y_test[INDICES] = torch.tensor(LABELS)
    x_test = torch.randint(0, 256, (30, *SHAPE), dtype=torch.uint8)
    data = ImageData("cifar10", x_test, y_test, x_test, y_test, 10, *CIFAR10_NORM)
    sets = eval_sets(data, attack)
    assert torch.equal(sets.x_bd, attack.state_dict()["x_bd"]) and torch.equal(sets.x_clean, x_test)
    expected_acc = (y_test == 0).float().mean().item()
    assert imported_metrics(model, attack, data) == {"acc": expected_acc, "asr": 1.0, "ra": 0.0}
    y_test[INDICES[0]] = 4  # another data set: its labels disagree with the record's
    with pytest.raises(AttackError, match="attack imported: state.index: .* do not match this test set"):
        eval_sets(ImageData("cifar10", x_test, y_test, x_test, y_test, 10, *CIFAR10_NORM), attack)
    with pytest.raises(AttackError, match="attack imported: state.index"):
        eval_sets(ImageData("cifar10", x_test[:10], y_test[:10], x_test[:10], y_test[:10], 10, *CIFAR10_NORM), attack)


def test_imported_attack_cannot_poison_or_exist_without_its_test_set(tmp_path, weights):
    import_backdoorbench(write_record(tmp_path / "run", weights), tmp_path / "model")
    _, attack, _ = load_record(tmp_path / "model")
    x, y = torch.zeros(4, *SHAPE, dtype=torch.uint8), torch.arange(4)
    with pytest.raises(AttackError, match="attack imported: poison_train: an imported model cannot be re-trained"):
        attack.poison_train(x, y, seed=0)
    with pytest.raises(AttackError, match="attack imported: apply: the trigger is unknown"):
        attack.apply(x)
    with pytest.raises(AttackError, match="attack imported: state: required"):
        make_attack("imported", {}, SHAPE, 10)
    state = attack.state_dict()
    with pytest.raises(AttackError, match=r"attack imported: state.y_true: expected a non-empty torch.int64"):
        make_attack("imported", {}, SHAPE, 10, state=state | {"y_true": state["y_true"][:2]})
    with pytest.raises(AttackError, match=r"attack imported: state.y_bd: labels must be in \[0, 9\]"):
        make_attack("imported", {}, SHAPE, 10, state=state | {"y_bd": state["y_bd"] + 10})


def test_reading_refuses_any_global_beyond_numpy_arrays(tmp_path, weights):
    marker = tmp_path / "ran"
    cases = [({"model": EvilDict(weights)}, "EvilDict"), ({"bd_train": RunsCommand(marker)}, "posix.system")]
    for number, (fields, name) in enumerate(cases):
        source = write_record(tmp_path / f"run{number}", weights, **fields)
        import_fails(source, tmp_path / f"model{number}", f"{source / 'attack_result.pt'}: refused:", name)
    assert not marker.exists()


def test_reading_refuses_numpy_object_arrays(tmp_path):
    path = tmp_path / "attack_result.pt"
    torch.save({"poison_indicator": np.array([1, "x"], dtype=object)}, path)
    with pytest.raises(BackdoorBenchError, match=r"refused: .*ObjectDType") as caught:
        read_attack_result(path)
    assert "\n" not in str(caught.value)


def test_reading_accepts_files_written_under_numpy_1(tmp_path):
    # NumPy 1.x pickles arrays and scalars through numpy.core.multiarray, which NumPy 2 renamed numpy._core.
    saved = {"index": np.arange(3), "indicator": np.zeros(3, dtype=np.float32), "key": np.int64(5), "t": torch.ones(2)}
    torch.save(saved, tmp_path / "numpy2.pt")
    with zipfile.ZipFile(tmp_path / "numpy2.pt") as source, zipfile.ZipFile(tmp_path / "numpy1.pt", "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/data.pkl"):
                assert b"cnumpy._core.multiarray\n" in data
                data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
            target.writestr(info, data)
    loaded = read_attack_result(tmp_path / "numpy1.pt")
    assert loaded.keys() == saved.keys() and loaded["key"] == 5 and torch.equal(loaded["t"], saved["t"])
    assert np.array_equal(loaded["index"], saved["index"]) and loaded["indicator"].dtype == np.float32


def test_unreadable_or_missing_files_are_named(tmp_path, weights):
    (tmp_path / "empty").mkdir()
    import_fails(tmp_path / "empty", tmp_path / "model", "attack_result.pt: missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "attack_result.pt").write_bytes(b"not a checkpoint")
    import_fails(tmp_path / "junk", tmp_path / "model", "attack_result.pt: not a readable torch.save file")
    source = write_record(tmp_path / "run", weights)
    png = source / "bd_test_dataset" / "2" / "3.png"
    png.write_bytes(b"not a png")
    import_fails(source, tmp_path / "model", f"{png}: not a readable image")
    png.unlink()
    import_fails(source, tmp_path / "model", f"{png}: missing")


@pytest.mark.parametrize("fields, fragments", [
    ({"model_name": "vgg19_bn"}, ["model_name: 'vgg19_bn' is not supported (supported: preactresnet18)"]),
    ({"clean_data": "mnist"}, ["clean_data: 'mnist' is not supported (supported: cifar10, cifar100, gtsrb, tiny)"]),
    ({"num_classes": 100}, ["model: weights do not fit preactresnet18 with 100 classes and 3 channels",
                            "linear.weight has shape (10, 512), expected (100, 512)"]),
    ({"img_size": [32, 32]}, ["img_size: expected (height, width, channels), got [32, 32]"]),
    ({"bd_test": {"bd_data_container": {"data_dict": {}}}}, ["bd_test: bd_data_container.data_dict: missing or empty"]),
    ({"bd_test": {"bd_data_container": {"data_dict": {3: {"path": "../../x.png", "other_info": [0, 1]}}}}},
     ["bd_test: data_dict[3]: expected", "path '../../x.png' does not lie under bd_test_dataset/"]),
    ({"bd_test": {"bd_data_container": {"data_dict": {3: {"path": "bd_test_dataset/1/3.png", "other_info": [0]}}}}},
     ["bd_test: data_dict[3]: expected {'path': str, 'other_info': [bd_label, label]}"]),
])
def test_a_record_that_does_not_fit_is_refused_in_one_line(tmp_path, weights, fields, fragments):
    source = write_record(tmp_path / "run", weights, **fields)
    import_fails(source, tmp_path / "model", str(source / "attack_result.pt"), *fragments)


def test_weights_with_missing_or_extra_keys_are_refused(tmp_path, weights):
    missing = {key: value for key, value in weights.items() if key != "linear.bias"}
    source = write_record(tmp_path / "run", missing)
    import_fails(source, tmp_path / "model", "model: weights do not fit preactresnet18", "missing linear.bias")
    extra = weights | {"fc.weight": torch.zeros(10, 512)}
    source = write_record(tmp_path / "run", extra)
    import_fails(source, tmp_path / "model", "unexpected fc.weight; 0 missing, 1 unexpected")


def test_labels_that_follow_no_rule_and_a_missing_data_root_are_refused(tmp_path, weights):
    source = write_record(tmp_path / "run", weights, bd_labels=[0, 1, 0, 0])
    import_fails(source, tmp_path / "model", "bd_test: backdoor labels follow neither all2one")
    source = write_record(tmp_path / "run", weights)
    (tmp_path / "no-data").mkdir()
    import_fails(source, tmp_path / "model", "dataset cifar10:", "not found", error=DataError,
                 data_root=tmp_path / "no-data")


def test_cli_imports_a_record_and_reports_asr_and_ra(tmp_path, weights):
    source = write_record(tmp_path / "run", weights)
    command = [sys.executable, "-m", "orchestrator.cli", "import-backdoorbench", str(source), "--device", "cpu"]
    result = subprocess.run([*command, "--out", str(tmp_path / "model"), "--json"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"model record: {tmp_path / 'model'}" and lines[1] == "ASR 100.00%  RA 0.00%"
    assert json.loads(lines[-1]) == {"asr": 1.0, "ra": 0.0}
    assert load_record(tmp_path / "model")[2].attack == "imported"
    (source / "attack_result.pt").write_bytes(b"junk")
    result = subprocess.run([*command, "--out", str(tmp_path / "other")], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: {source / 'attack_result.pt'}: not a readable torch.save file")
    assert not (tmp_path / "other").exists()
