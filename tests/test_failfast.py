"""Values that cannot give a meaningful result are refused up front, in one line naming the field, before
anything is written; anything else that goes wrong is one line too, with the traceback behind --debug."""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from backdoor import AttackError, RecipeError, TrainRecipe, build_model, make_attack, save_record
from backdoor.record import ModelRecord, RecordError, load_record
from backdoor.tensorfile import TensorFileError, decode
from orchestrator import cli
from orchestrator.spec import SpecError, load_grid
from sau_kernel import SAUConfig, SAUConfigError

from conftest import TINY_GRID
from processes import REPO, sau


def assert_one_line(result: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def grid_text(**changes) -> str:
    grid = {**TINY_GRID, **changes, "sau": {**TINY_GRID["sau"], **changes.get("sau", {})}}
    return yaml.safe_dump(grid, sort_keys=False)


@pytest.mark.parametrize("changes, message", [
    ({"sau": {"eps": float("inf")}}, "sau.eps: must be a finite number (got inf)"),
    ({"sau": {"lr": float("inf")}}, "sau.lr: must be a finite number (got inf)"),
    ({"sau": {"eps": [0.1, float("nan")]}}, "sau.eps[1]: must be a finite number (got nan)"),
    ({"attacks": [{"name": "blended", "alpha": float("nan")}]}, "attacks[0].alpha: must be a finite number"),
    ({"attack_training": {"lr": float("inf")}}, "attack_training.lr: must be a finite number"),
    ({"sau": {"eps": 1e308}}, "sau.eps: must be > 0 and <= 1 (images are in [0, 1])"),
    ({"sau": {"eps": 1.5}}, "sau.eps: must be > 0 and <= 1"),
    ({"sau": {"rounds": 10**9}}, "sau.rounds: must be in [1, 100000]"),
    ({"sau": {"pgd_steps": 10**9}}, "sau.pgd_steps: must be in [1, 1000]"),
    ({"attack_training": {"epochs": 10**9}}, "attack_training.epochs: must be <= 100000"),
    ({"seeds": [2**70]}, "seeds[0]: Input should be less than or equal to 4294967295"),
    ({"attacks": [{"name": "blended", "pattern_seed": 2**70}]}, "attacks[0].pattern_seed: must be in [0, 2**63)"),
    ({"sau": {"lr": [round(1e-4 * i, 6) for i in range(1, 201)], "pgd_step_size": [0.01 * i for i in range(1, 101)],
              "beta_js": [0.01 * i for i in range(1, 101)]}}, "sau: the axes make 2,000,000 combinations"),
])
def test_grid_values_without_meaning_are_refused_naming_the_field(tmp_path, changes, message):
    path = tmp_path / "grid.yaml"
    path.write_text(grid_text(**changes))
    with pytest.raises(SpecError) as error:
        load_grid(path)
    assert str(error.value) == f"{path}: {message}" or str(error.value).startswith(f"{path}: {message}")


def test_duplicate_yaml_key_is_refused_with_line_and_column(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(grid_text().replace("  rounds: 3\n", "  rounds: 3\n  lr: 0.5\n"))
    with pytest.raises(SpecError) as error:
        load_grid(path)
    assert str(error.value) == (f"{path}: line {grid_text().splitlines().index('  rounds: 3') + 2}, column 3: "
                                f"invalid YAML (duplicate key 'lr' (first given on line "
                                f"{grid_text().splitlines().index('  lr: 0.001') + 1}))")


def test_dataclasses_own_their_bounds():
    # `sau purify --param` and the Python API meet these without a grid.
    for kwargs, message in [({"eps": float("inf")}, "eps: must be a finite number"),
                            ({"lr": float("nan")}, "lr: must be a finite number"),
                            ({"eps": 1.01}, "eps: must be > 0 and <= 1"), ({"rounds": 10**9}, "rounds: must be in"),
                            ({"pgd_steps": 10**6}, "pgd_steps: must be in"), ({"seed": 2**63}, "seed: must be in")]:
        with pytest.raises(SAUConfigError, match=f"^{message}"):
            SAUConfig(**kwargs)
    with pytest.raises(RecipeError, match=r"^training\.lr: must be a finite number"):
        TrainRecipe(lr=float("inf"))
    with pytest.raises(RecipeError, match=r"^training\.epochs: must be <= 100000"):
        TrainRecipe(epochs=10**9)
    with pytest.raises(AttackError, match="alpha: must be a finite number"):
        make_attack("blended", {"alpha": float("inf")}, (1, 8, 8), 10)


def test_purify_refuses_a_non_finite_param(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["purify", str(tmp_path), "--param", "eps=inf", "--out", str(out)]) == 2
    assert capsys.readouterr().err == "error: --param eps: must be a finite number (got inf)\n"
    assert not out.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB filesystem (tmpfs): room for the sweep's first files and its model, not for its checkpoints and
    rows. Mounting one needs root; elsewhere the test is skipped, saying why."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                          text=True) if shutil.which("mount") else None
    if done is None or done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() if done else 'no mount command'})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_ends_the_sweep_in_one_line_and_leaves_no_temp_file(small_disk):
    grid = small_disk.parent / "tiny.yaml"
    grid.write_text(grid_text(sau={"eps": [0.1, 0.2]}))
    result = sau("run", str(grid), "--storage", str(small_disk / "sweep"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "No space left on device" in errors[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr and "ERROR" not in result.stderr, result.stderr
    assert not [p for p in small_disk.rglob("*") if p.name.endswith(".tmp")]
    info = json.loads((small_disk / "sweep" / "sweep.json").read_text())
    assert MlflowClient(info["tracking_uri"]).get_run(info["parent_run_id"]).info.status == "FAILED"


def test_a_grid_past_the_limit_asks_for_yes(tmp_path):
    grid = tmp_path / "big.yaml"
    grid.write_text(grid_text(seeds=list(range(1001))))
    assert_one_line(sau("run", str(grid)), "expands to 1,001 trials, more than 1,000; pass --yes", code=2)
    assert sorted(tmp_path.iterdir()) == [grid]


def test_a_clean_ratio_below_one_image_per_class_says_how_many_it_gives(tmp_path):
    grid = tmp_path / "few.yaml"
    grid.write_text(grid_text(sau={"clean_ratio": 1e-9}, storage=str(tmp_path / "runs")))
    assert_one_line(sau("run", str(grid)),
                    "sau.clean_ratio: 1e-09 of the 1438 training images gives 0, fewer than the 10 classes")
    assert sorted(tmp_path.iterdir()) == [grid]


def test_a_clean_ratio_in_a_defense_entry_is_checked_and_named_there(tmp_path):
    grid = tmp_path / "few.yaml"
    grid.write_text(grid_text(defenses=["none", {"name": "ft", "clean_ratio": 0.005}], storage=str(tmp_path / "runs")))
    assert_one_line(sau("run", str(grid)),
                    "defenses[1].clean_ratio: 0.005 of the 1438 training images gives 7, fewer than the 10 classes")
    assert sorted(tmp_path.iterdir()) == [grid]


@pytest.fixture
def digits_record(tmp_path) -> Path:
    """An untrained cnn-small model record for digits: these tests never get as far as purifying it."""
    torch.manual_seed(0)
    model = build_model("cnn-small", 10, 1, (0.3,), (0.3,))
    attack = make_attack("badnets", {}, (1, 8, 8), 10)
    record = ModelRecord(arch="cnn-small", num_classes=10, shape=(1, 8, 8), mean=(0.3,), std=(0.3,),
                         dataset="digits", attack="badnets", attack_params={}, seed=0, recipe={},
                         metrics={"acc": 0.1, "asr": 0.1, "ra": 0.1})
    save_record(tmp_path / "record", model, attack, record)
    return tmp_path / "record"


def test_purify_refuses_a_clean_ratio_below_one_image_per_class(digits_record, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["purify", str(digits_record), "--clean-ratio", "0.001", "--out", str(out)]) == 2
    assert capsys.readouterr().err == ("error: --clean-ratio: 0.001 of the 1438 training images gives 1, "
                                       "fewer than the 10 classes\n")
    assert not out.exists()


def test_purify_refuses_a_data_set_other_than_the_records(digits_record, tmp_path, capsys):
    npz = tmp_path / "other.npz"
    images = np.zeros((20, 8, 8), np.uint8)
    np.savez(npz, x_train=images, y_train=np.arange(20) % 10, x_test=images, y_test=np.arange(20) % 10)
    assert cli.main(["purify", str(digits_record), "--dataset", f"npz:{npz}"]) == 2
    assert capsys.readouterr().err == f"error: --dataset npz:{npz}: the model record was trained on digits\n"


@pytest.mark.parametrize("field, value", [("num_classes", 1_000_000_000), ("shape", [1, 8, 10**9]),
                                          ("std", [0.0]), ("mean", [1, 2]), ("metrics", {"acc": float("nan")})])
def test_record_json_out_of_range_is_refused_naming_the_field(digits_record, field, value):
    path = digits_record / "record.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, field: value}))
    with pytest.raises(RecordError, match=f"^{path}: {field}: "):
        load_record(digits_record)


def test_purify_of_a_forged_record_is_one_line(digits_record, tmp_path):
    path = digits_record / "record.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_classes": 1_000_000_000}))
    assert_one_line(sau("purify", str(digits_record)), f"{path}: num_classes: must be an integer in [2, 100000]")


def forged_npz(path: Path, claimed: tuple) -> None:
    """A valid archive of digits-sized images whose x_train header claims the shape `claimed`."""
    from numpy.lib import format as npy

    arrays = {"x_train": np.zeros((20, 8, 8), np.uint8), "y_train": np.arange(20) % 2,
              "x_test": np.zeros((4, 8, 8), np.uint8), "y_test": np.arange(4) % 2}
    with zipfile.ZipFile(path, "w") as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            if key == "x_train":
                npy.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": claimed})
                buffer.write(array.tobytes())
            else:
                npy.write_array(buffer, array)
            archive.writestr(f"{key}.npy", buffer.getvalue())


def test_a_forged_npz_header_is_one_line_not_a_memory_error(tmp_path):
    path = tmp_path / "forged.npz"
    forged_npz(path, (10**12, 8, 8))
    out = tmp_path / "out"
    assert_one_line(sau("attack", "--dataset", f"npz:{path}", "--attack", "badnets", "--arch", "cnn-small",
                        "--out", str(out)),
                    f"{path}: x_train: header says uint8 array of shape (1000000000000, 8, 8)", "does not fit")
    assert not out.exists()


def test_a_forged_tensor_file_shape_is_refused():
    # An empty tensor takes no bytes, so only the bound on each size stops torch's int64 overflow here.
    header = json.dumps({"w": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}).encode()
    with pytest.raises(TensorFileError, match="w: invalid shape"):
        decode(struct.pack("<Q", len(header)) + header)


def test_an_unexpected_error_is_one_line_with_the_traceback_behind_debug(tmp_path, monkeypatch, capsys):
    def broken(path):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(cli, "read_results", broken)
    assert cli.main(["report", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "error: RuntimeError: disk on fire (--debug shows the traceback)\n"
    assert cli.main(["report", str(tmp_path), "--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and err.endswith("error: RuntimeError: disk on fire\n")


def test_argument_errors_are_one_line():
    assert_one_line(sau("run", "grid.yaml", "--no-such-option"), "unrecognized arguments: --no-such-option")
    assert_one_line(sau("attack", "--dataset", "digits", "--attack", "badnets", "--arch", "cnn-small",
                        "--seed", str(2**70), "--out", "x"), "--seed: must be in [0, 4294967295]")


@pytest.mark.parametrize("module", ["orchestrator.store", "orchestrator.sweep"])
def test_ray_is_first_imported_with_its_local_settings(module):
    # Whatever module `import ray` comes through, the settings Ray reads at import time are already there.
    script = f"""
import os, sys
class Watch:
    def find_spec(self, name, path, target=None):
        if name == "ray":
            print("ray", os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"),
                  os.environ.get("TUNE_PRINT_ALL_TRIAL_ERRORS"))
sys.meta_path.insert(0, Watch())
import {module}
import ray
"""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "TUNE_PRINT_ALL_TRIAL_ERRORS")}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "ray 0 0"
