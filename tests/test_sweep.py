"""The sweep driver end to end: a real local Ray instance, MLflow sqlite store and server, Optuna, Parquet."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray
from mlflow import MlflowClient
from PIL import Image

from processes import (LOOPBACK, alive, free_port, kill_session, listening_addresses, process_tree, session_pids,
                       wait_until_healthy)

from backdoor.record import FILES
from orchestrator.results import finished_rows, read_results
from orchestrator.spec import expand, load_grid
from orchestrator.storage import Storage
from orchestrator.sweep import SweepError, run_sweep
from orchestrator.tables import select
from orchestrator.tracking import TRIAL_ID_TAG
from orchestrator.trial import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TWO_BY_TWO = {"attacks": [{"name": "badnets"}, {"name": "blended", "alpha": 0.2}], "sau": {"eps": [0.1, 0.2]}}


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One local Ray instance for the module; run_sweep uses it instead of starting its own."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never another cluster on the machine
    yield
    ray.shutdown()


def sweep(grid_path, storage, **kwargs):
    lines = []
    df = run_sweep(load_grid(grid_path), storage=storage, resume=kwargs.pop("resume", False), address=None,
                   tracking_uri=kwargs.pop("tracking_uri", None), out=lines.append)
    return df, lines


def child_runs(uri: str, storage: Path):
    client = MlflowClient(uri)
    info = json.loads((storage / "sweep.json").read_text())
    runs = client.search_runs([info["experiment_id"]], f"tags.`mlflow.parentRunId` = '{info['parent_run_id']}'")
    return client, info, runs


@pytest.fixture(scope="module")
def grid_sweep(write_grid, tmp_path_factory):
    path = write_grid(name="two-by-two", **TWO_BY_TWO)
    storage = tmp_path_factory.mktemp("grid") / "sweep"
    df, lines = sweep(path, storage)
    return path, storage, df, lines


def test_grid_sweep_writes_one_row_and_one_finished_run_per_trial(grid_sweep):
    path, storage, df, lines = grid_sweep
    specs = {s.trial_id: s for s in expand(load_grid(path))}
    assert len(specs) == 4
    assert sorted(df["trial_id"]) == sorted(specs) == sorted(set(finished_rows(storage / "results")))
    assert len(list((storage / "models").iterdir())) == 2  # 2 attacks x 1 arch x 1 seed, trained once each
    assert sum(line.startswith("[") for line in lines) == 4  # one progress line per finished trial

    client, info, runs = child_runs(f"sqlite:///{storage}/mlflow.db", storage)
    assert client.get_run(info["parent_run_id"]).info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(info["parent_run_id"])] == ["figures", "results.csv"]
    figures = [a.path for a in client.list_artifacts(info["parent_run_id"], "figures")]
    assert "figures/eps-acc_after-asr_after.png" in figures and "figures/eps-acc_after-asr_after.svg" in figures
    assert sum(f.startswith("figures/rounds-") for f in figures) == 2  # the best trial's curves, PNG and SVG
    local = storage / "figures"  # the same figures beside the rows
    assert sorted(f"figures/{p.name}" for p in local.iterdir()) == sorted(figures)
    downloaded = Path(client.download_artifacts(info["parent_run_id"], "figures", str(storage.parent)))
    assert all(p.read_bytes() == (local / p.name).read_bytes() for p in downloaded.iterdir())
    for png in local.glob("*.png"):  # two panels each: 2 x 640 by 400 pixels
        with Image.open(png) as image:
            image.load()
            assert image.size == (1280, 400), png.name
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in runs) == sorted(specs)
    for run in runs:
        row = df[df["trial_id"] == run.data.tags[TRIAL_ID_TAG]].iloc[0]
        assert run.info.status == "FINISHED" and run.info.run_id == row["mlflow_run_id"]
        for key in ("acc_before", "asr_after", "acc_after", "ra_after", "der", "seconds_sau"):
            assert run.data.metrics[key] == row[key]
        assert run.data.params == {k: str(v) for k, v in specs[row["trial_id"]].flat().items()}
        assert run.info.run_name == f"sau-{row['trial_id']}" and run.data.params["defense"] == "sau"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "acc")] == [2, 3]
        assert row["rounds_done"] == 3 and row["device"] == "cpu" and row["grid"] == "two-by-two"
        assert row["status"] == "finished"
        assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["history.csv", "row.json"]
        history = client.download_artifacts(run.info.run_id, "history.csv")
        assert len(Path(history).read_text().splitlines()) == 1 + 3  # header and one line per round
    assert not any((storage / "checkpoints").iterdir())


def test_rerun_without_resume_fails_and_writes_nothing(grid_sweep):
    path, storage, _, _ = grid_sweep
    before = sorted((p, p.stat().st_mtime_ns) for p in storage.rglob("*"))
    with pytest.raises(SweepError) as error:
        sweep(path, storage)
    assert str(error.value) == (f"{storage} already holds sweep 'two-by-two'; "
                                "pass --resume to continue it or choose another --storage")
    assert sorted((p, p.stat().st_mtime_ns) for p in storage.rglob("*")) == before


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout  # guards against a hang only, on a loaded machine
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, f"the sweep ended before {what}"
        time.sleep(0.2)


def test_local_sweep_is_local_says_one_line_per_fault_and_leaves_nothing(write_grid, tmp_path):
    # This module's own Ray instance runs meanwhile: ray.init() would join it; `sau run` must start its own.
    path = write_grid(name="local", sau={"eps": [0.1, 0.2], "rounds": 60})
    storage = tmp_path / "sweep"
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    with open(stdout, "w") as out, open(stderr, "w") as err:
        driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--storage",
                                   str(storage)], cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
    seen = set()
    try:
        checkpoints = storage / "checkpoints"
        wait_for(lambda: any(checkpoint_round(d) >= 2 for d in checkpoints.glob("*")), "a checkpoint", driver)
        processes = process_tree(driver.pid)
        seen = set(processes)
        assert "gcs_server" in processes.values() and "raylet" in processes.values(), processes
        addresses = listening_addresses(processes)
        assert addresses and {a.rpartition(":")[0] for a in addresses} <= LOOPBACK, addresses
        assert (Path.home() / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600

        # A fault Tune recovers from: a trial's worker dies; the trial continues from its checkpoint.
        (worker,) = [pid for pid, name in processes.items() if name.startswith("ray::ImplicitF")][:1]
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: "retrying" in stdout.read_text(), "the trial was retried", driver)
        seen |= set(process_tree(driver.pid))
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    printed = stdout.read_text() + stderr.read_text()
    assert "Traceback" not in printed, printed
    assert sum("retrying" in line for line in printed.splitlines()) == 1, printed
    assert "started a local Ray instance, on 127.0.0.1 only" in stdout.read_text()
    assert driver.returncode == 2 and stderr.read_text().splitlines()[-1].startswith("error: interrupted with")
    assert alive(seen) == [], {pid: processes.get(pid) for pid in alive(seen)}
    info = json.loads((storage / "sweep.json").read_text())
    assert MlflowClient(info["tracking_uri"]).get_run(info["parent_run_id"]).info.status == "KILLED"


def checkpoint_round(directory: Path) -> int:
    """The round a trial's newest checkpoint holds (named after it), 0 where there is none (yet, or any more)."""
    return max((int(p.stem.partition("-")[2]) for p in directory.glob("state-*.pt")), default=0)


def test_killed_sweep_resumes_without_duplicates(write_grid, tmp_path):
    # The kill lands while a long trial holds a checkpoint from the middle of its rounds.
    path = write_grid(name="killed", sau={"eps": [0.1, 0.2], "rounds": [30, 2]})
    storage = tmp_path / "sweep"
    specs = {s.trial_id: s for s in expand(load_grid(path))}
    long_trials = [storage / "checkpoints" / i for i, s in specs.items() if s.params["rounds"] == 30]
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent(f"""
        from pathlib import Path
        from orchestrator.spec import load_grid
        from orchestrator.sweep import run_sweep
        run_sweep(load_grid({str(path)!r}), storage=Path({str(storage)!r}), resume=False, address=None,
                  tracking_uri=None)
    """))
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen([sys.executable, str(script)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not any(0 < checkpoint_round(p) < 30 for p in long_trials):
            assert driver.poll() is None and time.monotonic() < deadline, "sweep ended before it could be killed"
            time.sleep(0.2)
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        kill_session(driver.pid)  # Ray's workers and agents outlive a killed driver
        driver.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    checkpoints = {d.name: load_checkpoint(Storage(d)) for d in (storage / "checkpoints").iterdir()
                   if any(d.glob("state-*.pt"))}
    assert any(state["purify"]["round"] < specs[i].params["rounds"] for i, state in checkpoints.items())
    done_before = set(finished_rows(storage / "results"))
    df, lines = sweep(path, storage, resume=True)
    assert f"killed: {4 - len(done_before)} trials to run, {len(done_before)} already finished" in lines

    assert sorted(df["trial_id"]) == sorted(specs)
    client, _, runs = child_runs(f"sqlite:///{storage}/mlflow.db", storage)
    finished_runs = [r.data.tags[TRIAL_ID_TAG] for r in runs if r.info.status == "FINISHED"]
    assert sorted(finished_runs) == sorted(specs)
    for trial_id, state in checkpoints.items():  # continued from the checkpoint, in the same MLflow run
        row = df[df["trial_id"] == trial_id].iloc[0]
        rounds = specs[trial_id].params["rounds"]
        assert 0 < state["purify"]["round"] <= rounds == row["rounds_done"]
        assert row["mlflow_run_id"] == state["mlflow_run_id"]
        assert [m.step for m in client.get_metric_history(row["mlflow_run_id"], "loss")] == list(range(1, rounds + 1))


SEARCH = {"num_samples": 3, "max_concurrent": 2, "sampler": "tpe", "seed": 0,
          "space": {"lmd_sar": {"low": 0.1, "high": 10.0, "log": True}, "eps": {"low": 0.05, "high": 0.3}},
          "objectives": [{"metric": "acc_after", "mode": "max"}, {"metric": "asr_after", "mode": "min"}]}


def test_two_objective_search_writes_a_pareto_front(write_grid, tmp_path):
    path = write_grid(name="search2", search=SEARCH)
    storage = tmp_path / "sweep"
    df, lines = sweep(path, storage)
    assert len(df) == 3
    assert len({(r["sau.lmd_sar"], r["sau.eps"]) for _, r in df.iterrows()}) == 3
    study = optuna.load_study(study_name="search2", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(storage / "optuna.journal"))))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3

    front = pd.read_csv(storage / "pareto.csv")
    acc, asr = df["acc_after"].to_numpy(), df["asr_after"].to_numpy()
    dominated = [((acc >= a) & (asr <= s) & ((acc > a) | (asr < s))).any() for a, s in zip(acc, asr)]
    assert sorted(front["trial_id"]) == sorted(df["trial_id"][[not d for d in dominated]])


def test_single_objective_search_runs_and_resumes(write_grid, tmp_path):
    space = {"lmd_sar": {"low": 0.1, "high": 10.0, "log": True}, "pgd_steps": {"low": 1, "high": 3},
             "pgd_step_size": {"choices": [0.1, 0.2]}}
    search = {**SEARCH, "num_samples": 2, "space": space, "objectives": [{"metric": "der", "mode": "max"}]}
    path = write_grid(name="search1", search=search)
    storage = tmp_path / "sweep"
    df, _ = sweep(path, storage)
    assert len(df) == 2 and not (storage / "pareto.csv").exists()
    assert df["sau.pgd_steps"].dtype.kind == "i" and set(df["sau.pgd_steps"]) <= {1, 2, 3}
    assert set(df["sau.pgd_step_size"]) <= {0.1, 0.2}
    df, lines = sweep(path, storage, resume=True)
    assert len(df) == 2 and "search1: 0 trials to run, 2 already finished" in lines


def test_asha_stops_hopeless_trials_and_marks_their_rows_stopped(write_grid, tmp_path):
    """Learning rates down to 1e-8 leave the backdoor in place: ASHA stops such trials at round 2. Its rungs are
    at rounds 2 and 4, the last round: a trial that ran all 4 rounds is finished, whatever the last rung says."""
    search = {"num_samples": 6, "max_concurrent": 1, "sampler": "random", "seed": 0,
              "space": {"lr": {"low": 1.0e-8, "high": 0.05, "log": True}},
              "objectives": [{"metric": "asr_after", "mode": "min"}],
              "scheduler": {"name": "asha", "grace_rounds": 2, "reduction_factor": 2}}
    path = write_grid(name="asha", sau={"rounds": 4}, eval_every=2, search=search)
    storage = tmp_path / "sweep"
    df, lines = sweep(path, storage)
    rows = read_results(storage)
    stopped, finished = rows[rows["status"] == "stopped"], rows[rows["status"] == "finished"]
    assert len(rows) == 6 and len(stopped) >= 1 and len(finished) >= 1, rows[["sau.lr", "status", "asr_after"]]
    assert set(stopped["rounds_done"]) == {2} and set(finished["rounds_done"]) == {4}
    assert sum("stopped at round" in line for line in lines) == len(stopped)
    # A stopped trial's row holds what it reached at the round it was stopped at.
    client, info, runs = child_runs(f"sqlite:///{storage}/mlflow.db", storage)
    status = {r.data.tags[TRIAL_ID_TAG]: r.info.status for r in runs}
    for _, row in stopped.iterrows():
        assert status[row["trial_id"]] == "KILLED"
        history = client.get_metric_history(row["mlflow_run_id"], "asr")
        assert max(m.step for m in history) >= row["rounds_done"]
        assert row["asr_after"] == pytest.approx([m.value for m in history if m.step == row["rounds_done"]][0])
    assert {status[t] for t in finished["trial_id"]} == {"FINISHED"}
    assert not list((storage / "checkpoints").glob("*/state-*.pt"))
    assert len(select(rows, {})) == len(finished)  # `sau report` shows finished trials by default


def test_unreachable_tracking_server_loses_no_row(write_grid, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    path = write_grid(name="untracked")
    storage = tmp_path / "sweep"
    df, _ = sweep(path, storage, tracking_uri=f"http://127.0.0.1:{free_port()}")
    assert len(df) == 1 and df["mlflow_run_id"].tolist() == [""]
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warning: MLflow" in line]
    assert len(warnings) == 1 and "continuing without tracking" in warnings[0]


def test_mlflow_server_receives_the_child_runs(write_grid, tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_healthy(server, uri, 120)
        storage = tmp_path / "sweep"
        df, _ = sweep(write_grid(name="served"), storage, tracking_uri=uri)
        client, info, runs = child_runs(uri, storage)
        assert [r.info.run_id for r in runs] == df["mlflow_run_id"].tolist()
        assert runs[0].info.status == "FINISHED" and runs[0].data.metrics["acc_after"] == df["acc_after"][0]
        assert [a.path for a in client.list_artifacts(info["parent_run_id"])] == ["figures", "results.csv"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_a_diverging_trial_stops_and_is_recorded_as_diverged(write_grid, tmp_path):
    # lr 1e30 makes the first step's weights overflow: the next loss is not finite.
    storage = tmp_path / "sweep"
    df, lines = sweep(write_grid(name="diverging", sau={"lr": 1e30}), storage)
    row = df.iloc[0]
    assert row["status"] == "diverged" and row["rounds_done"] < 3
    assert all(pd.isna(row[k]) for k in ("acc_after", "asr_after", "ra_after", "der"))
    assert 0 < row["acc_before"] <= 1  # the model's own figures stay
    assert any("diverged at round" in line for line in lines), lines


def test_a_trial_that_cannot_succeed_is_not_retried(write_grid, tmp_path):
    # A forged model record in the store, whole by its checksums: the same error on every attempt, so Tune must
    # not retry it.
    path = write_grid(name="forged")
    (spec,) = expand(load_grid(path))
    storage = tmp_path / "sweep"
    record = storage / "models" / spec.model_key
    record.mkdir(parents=True)
    for name in FILES:
        (record / name).write_bytes(name.encode())
    meta = {"format": "sau-model-record/1", "arch": "cnn-small", "num_classes": 1_000_000_000, "shape": [1, 8, 8],
            "mean": [0.3], "std": [0.3], "dataset": "digits", "attack": "badnets", "attack_params": {}, "seed": 0,
            "recipe": {}, "metrics": {},
            "sha256": {name: hashlib.sha256(name.encode()).hexdigest() for name in FILES}}
    (record / "record.json").write_text(json.dumps(meta))
    lines = []
    with pytest.raises(SweepError, match="1 of the trials failed.*num_classes: must be an integer in"):
        run_sweep(load_grid(path), storage=storage, resume=False, address=None, tracking_uri=None,
                  out=lines.append)
    assert not any("retrying" in line for line in lines), lines
    assert any(line.startswith("[1/1] trial") and "failed: RecordError" in line for line in lines), lines
    info = json.loads((storage / "sweep.json").read_text())
    assert MlflowClient(info["tracking_uri"]).get_run(info["parent_run_id"]).info.status == "FAILED"


def test_a_torn_row_and_a_damaged_model_record_are_set_aside_and_redone(write_grid, tmp_path, capfd):
    path = write_grid(name="damaged")
    (spec,) = expand(load_grid(path))
    storage = tmp_path / "sweep"
    df, _ = sweep(path, storage)
    row = storage / "results" / f"{spec.trial_id}.parquet"
    row.write_bytes(row.read_bytes()[:-12])  # no footer: a writer that died mid-file
    weights = storage / "models" / spec.model_key / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    capfd.readouterr()
    again, lines = sweep(path, storage, resume=True)
    assert "damaged: 1 trials to run, 0 already finished" in lines
    assert "stage 1: training 1 backdoored models" in lines
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "unreadable row" in warnings[0] and "damaged model record" in warnings[1]
    assert (storage / "results" / "_corrupt" / row.name).is_file()
    assert (storage / "models" / "_corrupt" / spec.model_key / "model.safetensors").is_file()
    figures = ["acc_before", "asr_before", "ra_before", "acc_after", "asr_after", "ra_after", "der"]
    assert again[figures].equals(df[figures])  # retrained and rerun: the same figures, bit for bit


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert session_pids(driver.pid) == []  # nothing the command started outlives it
    return subprocess.CompletedProcess(driver.args, driver.returncode, stdout, stderr)


def test_resources_the_cluster_lacks_fail_in_one_line_and_write_nothing(write_grid, tmp_path):
    storage = tmp_path / "sweep"
    result = run_cli("run", str(write_grid(name="gpu", resources={"cpu": 1, "gpu": 1})), "--storage", str(storage),
                     cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: resources: a trial asks for 1 CPU and 1 GPU, but no node of the Ray cluster has that "
        f"(its nodes: {os.cpu_count():g} CPU, 0 GPU)"], result.stderr
    assert not storage.exists()


def test_unwritable_storage_fails_in_one_line(write_grid, tmp_path):
    result = run_cli("run", str(write_grid(name="proc")), "--storage", "/proc/self", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert re.match(r"error: storage /proc/\d+: not writable \(", result.stderr), result.stderr  # /proc/self resolved
