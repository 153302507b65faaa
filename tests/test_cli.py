"""The `sau` command as a user runs it: real processes, real files, exit codes and what they print."""

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from backdoor import load_dataset, load_record
from conftest import TINY_GRID
from processes import REPO, SAU, sau, session_pids


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, one line on stderr that names what was wrong, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def digits_record(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("attack") / "badnets"
    result = sau("attack", "--dataset", "digits", "--attack", "badnets", "--param", "patch_size=2",
                 "--arch", "cnn-small", "--epochs", "6", "--lr", "0.05", "--batch-size", "64",
                 "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures) == {"acc", "asr", "ra"} and all(0 <= v <= 1 for v in figures.values())
    assert figures["acc"] > 0.9 and figures["asr"] > 0.9  # the backdoor took
    return out


def test_attack_writes_a_model_record_with_its_figures(digits_record):
    model, attack, record = load_record(digits_record)
    assert (record.attack, record.arch, attack.params.patch_size) == ("badnets", "cnn-small", 2)
    assert set(record.metrics) == {"acc", "asr", "ra"}


def test_purify_prints_before_and_after_and_writes_the_purified_record(digits_record, tmp_path):
    out = tmp_path / "purified"
    result = sau("purify", str(digits_record), "--clean-ratio", "0.2", "--param", "lr=1e-3",
                 "--param", "rounds=8", "--param", "batch_size=64", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures) == {"acc_before", "asr_before", "ra_before", "acc_after", "asr_after", "ra_after",
                            "der", "seconds"}
    assert all(0 <= figures[k] <= 1 for k in figures if k != "seconds") and figures["seconds"] > 0
    assert figures["asr_after"] < figures["asr_before"]  # SAU removes (some of) the backdoor
    _, _, record = load_record(out)
    assert record.metrics == {k: figures[f"{k}_after"] for k in ("acc", "asr", "ra")}
    assert "ASR" in result.stdout and "DER" in result.stdout


def test_purify_with_the_fine_tuning_baseline_and_no_defense(digits_record):
    ft = sau("purify", str(digits_record), "--defense", "ft", "--clean-ratio", "0.2", "--param", "lr=1e-3",
             "--param", "rounds=3", "--param", "batch_size=64", "--json")
    assert ft.returncode == 0, ft.stderr
    assert "defense: ft" in ft.stdout and "rounds: 3" in ft.stdout
    assert ft.stderr.count("round ") == 3
    none = sau("purify", str(digits_record), "--defense", "none", "--json")
    assert none.returncode == 0, none.stderr
    figures = json.loads(none.stdout.strip().splitlines()[-1])
    assert figures["acc_after"] == figures["acc_before"] and figures["der"] == 0.5


@pytest.mark.parametrize("args, fragments", [
    (["attack", "--dataset", "digits", "--attack", "nosuch", "--arch", "cnn-small"], ["nosuch", "unknown attack"]),
    (["attack", "--dataset", "digits", "--attack", "badnets", "--param", "patch_size=9", "--arch", "cnn-small"],
     ["patch_size"]),
    (["attack", "--dataset", "digits", "--attack", "badnets", "--arch", "resnet999"], ["resnet999"]),
    (["attack", "--dataset", "digits", "--attack", "badnets", "--arch", "vgg19_bn"], ["vgg19_bn", "8x8"]),
    (["attack", "--dataset", "cifar10", "--data-root", "/nonexistent/data", "--attack", "badnets",
      "--arch", "cnn-small"], ["/nonexistent/data"]),
    (["attack", "--dataset", "npz:/nonexistent/x.npz", "--attack", "badnets", "--arch", "cnn-small"],
     ["/nonexistent/x.npz"]),
])
def test_bad_attack_input_is_one_line_and_writes_nothing(args, fragments, tmp_path):
    out = tmp_path / "out"
    assert_user_error(sau(*args, "--out", str(out)), *fragments)
    assert not out.exists()


def test_purify_fast_mode_gives_the_reference_figures(digits_record):
    common = ["purify", str(digits_record), "--clean-ratio", "0.2", "--param", "lr=1e-3", "--param", "rounds=3",
              "--param", "batch_size=64", "--device", "cpu", "--json"]
    figures = []
    for mode in ("reference", "fast"):
        result = sau(*common, "--param", f"mode={mode}")
        assert result.returncode == 0, result.stderr
        figures.append(json.loads(result.stdout.strip().splitlines()[-1]))
    reference, fast = figures
    # On the CPU the two purified models agree to about 1e-8 (tests/test_sau_fast.py): the same predictions.
    assert {k: fast[k] for k in ("acc_after", "asr_after", "ra_after")} == \
        {k: reference[k] for k in ("acc_after", "asr_after", "ra_after")}


@pytest.mark.parametrize("args, fragments", [
    (["--param", "eps=0"], ["eps", "> 0"]),
    (["--param", "eps=-0.1"], ["eps"]),
    (["--clean-ratio", "0"], ["--clean-ratio", "(0, 1]"]),
    (["--clean-ratio", "1.5"], ["--clean-ratio"]),
    (["--param", "warp=3"], ["warp", "SAUConfig"]),
    (["--defense", "ft", "--param", "eps=0.1"], ["eps", "FTConfig"]),
    (["--defense", "ft", "--param", "lr=0"], ["lr", "> 0"]),
    (["--param", "mode=turbo"], ["mode", "reference, fast"]),
])
def test_bad_purify_input_is_one_line_and_writes_nothing(digits_record, args, fragments, tmp_path):
    out = tmp_path / "out"
    assert_user_error(sau("purify", str(digits_record), *args, "--out", str(out)), *fragments)
    assert not out.exists()


def test_purify_refuses_a_directory_that_is_not_a_model_record(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    out = tmp_path / "out"
    assert_user_error(sau("purify", str(tmp_path), "--out", str(out)), str(tmp_path))
    assert not out.exists()


def test_run_with_a_bad_grid_field_names_file_and_field(tmp_path):
    grid = yaml.safe_load((REPO / "experiments" / "quickstart.yaml").read_text())
    grid["sau"]["eps"] = [0.1, 0]
    grid["storage"] = str(tmp_path / "runs")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert_user_error(sau("run", str(path)), str(path), "sau.eps")
    assert sorted(tmp_path.iterdir()) == [path]


def test_run_with_a_patch_too_big_for_the_images_writes_nothing(tmp_path):
    grid = yaml.safe_load((REPO / "experiments" / "quickstart.yaml").read_text())
    grid["attacks"] = [{"name": "badnets", "patch_size": 12}]
    grid["storage"] = str(tmp_path / "runs")
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert_user_error(sau("run", str(path)), "attacks[0]", "patch_size")
    assert sorted(tmp_path.iterdir()) == [path]


def test_run_with_an_architecture_too_big_for_the_images_writes_nothing(tmp_path):
    grid = yaml.safe_load((REPO / "experiments" / "quickstart.yaml").read_text())
    grid["archs"] = ["cnn-small", "densenet161"]
    grid["storage"] = str(tmp_path / "runs")
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert_user_error(sau("run", str(path)), "archs[1]", "densenet161", "8x8")
    assert sorted(tmp_path.iterdir()) == [path]


def test_run_reads_a_relative_data_path_from_where_it_is_started(tmp_path):
    """Stage 1 and the trials both read `npz:digits.npz` in the directory `sau run` was started in."""
    data = load_dataset("digits")
    arrays = {key: getattr(data, key).numpy() for key in ("x_train", "y_train", "x_test", "y_test")}
    np.savez(tmp_path / "digits.npz", **{k: v.transpose(0, 2, 3, 1) if k.startswith("x") else v
                                         for k, v in arrays.items()})
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({**TINY_GRID, "name": "relative",
                                                        "dataset": {"name": "npz:digits.npz"}}))
    result = sau("run", "grid.yaml", "--storage", "sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(list((tmp_path / "sweep" / "results").glob("*.parquet"))) == 1


def test_report_without_results_is_a_clear_error(tmp_path):
    assert_user_error(sau("report", str(tmp_path)), str(tmp_path))


def test_every_command_has_help():
    for command in ([], ["run"], ["attack"], ["purify"], ["report"], ["sync"]):
        result = sau(*command, "--help")
        assert result.returncode == 0 and "usage: sau" in result.stdout


def test_ctrl_c_stops_the_sweep_with_an_error_and_resume_finishes_it(write_grid, tmp_path):
    path = write_grid(name="interrupted", attacks=[{"name": "badnets"}, {"name": "blended"}],
                      sau={"eps": [0.1, 0.2], "rounds": 6})
    storage = tmp_path / "sweep"
    run = subprocess.Popen([*SAU, "run", str(path), "--storage", str(storage)], cwd=REPO, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 900  # guards against a hang only: a loaded 2-core machine needed over 300 s
    while not (storage / "results").is_dir() or not any((storage / "results").glob("*.parquet")):
        assert run.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be stopped"
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=900)
    assert session_pids(run.pid) == []  # the local Ray instance ended with the sweep
    rows = len(list((storage / "results").glob("*.parquet")))
    assert rows < 4  # two trials run at a time: at the first row, at least two were still to finish
    # A stopped trial may still finish in a worker that outlives the driver, so counts are read, not assumed.
    unfinished = re.search(r"interrupted with (\d+) trials unfinished; pass --resume", stderr)
    assert run.returncode == 2 and unfinished and int(unfinished[1]) >= 4 - rows, stderr

    resumed = sau("run", str(path), "--storage", str(storage), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    counts = re.search(r"(\d+) trials to run, (\d+) already finished", resumed.stdout)
    assert counts and int(counts[1]) + int(counts[2]) == 4 and int(counts[2]) >= rows, resumed.stdout
    info = json.loads((storage / "sweep.json").read_text())
    runs = MlflowClient(info["tracking_uri"]).search_runs(
        [info["experiment_id"]], f"tags.`mlflow.parentRunId` = '{info['parent_run_id']}'")
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4  # interrupted attempts left no run behind
    assert len({r.data.tags["sau.trial_id"] for r in runs}) == 4
