"""Sweeps on Ray clusters made of real `ray start` processes on this machine: infra/sweep.py submitted through
the Jobs API, and a worker node whose raylet is killed while it runs trials."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.results import finished_rows, read_results
from orchestrator.spec import expand, load_grid
from orchestrator.tracking import TRIAL_ID_TAG
from processes import RAY, LocalCluster, listening_addresses, process_name, session_pids

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.", "[::ffff:127.", "[::1]")

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_tmp():
    """A short temp dir (Ray's socket paths must fit 107 bytes) that this test's Ray nodes alone use."""
    path = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def child_runs(storage: Path):
    info = json.loads((storage / "sweep.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    runs = client.search_runs([info["experiment_id"]], f"tags.`mlflow.parentRunId` = '{info['parent_run_id']}'")
    return client, runs


def test_entry_script_runs_a_grid_through_ray_job_submit(write_grid, tmp_path, ray_tmp):
    grid_path = write_grid(name="submitted", sau={"eps": [0.1, 0.2]})
    storage = tmp_path / "sweep"
    cluster = LocalCluster(ray_tmp, head_cpus=2)
    try:
        addresses = listening_addresses(cluster.pids())
        # What the README gives: the repository as the job's working dir, infra/sweep.py as the entrypoint.
        job = subprocess.run(
            [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO), "--",
             "python", "infra/sweep.py", str(grid_path), "--storage", str(storage)],
            env=cluster.env, capture_output=True, text=True, timeout=600)
    finally:
        cluster.stop()
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    assert addresses and all(a.startswith(LOOPBACK) for a in addresses), addresses

    specs = {s.trial_id for s in expand(load_grid(grid_path))}
    assert set(finished_rows(storage / "results")) == specs
    client, runs = child_runs(storage)
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in runs) == sorted(specs)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert set(read_results(storage)["mlflow_run_id"]) == {r.info.run_id for r in runs}


def logged_rounds(storage: Path) -> dict[str, tuple[str, list]]:
    """trial id -> (its MLflow run, the loss metrics logged so far), from the sweep's store; {} before it exists."""
    if not (storage / "sweep.json").exists():
        return {}
    try:
        client, runs = child_runs(storage)
        return {r.data.tags[TRIAL_ID_TAG]: (r.info.run_id, client.get_metric_history(r.info.run_id, "loss"))
                for r in runs if r.info.status == "RUNNING"}
    except Exception:  # the store is being created by the driver
        return {}


def test_trials_on_a_killed_worker_node_finish_once_from_their_checkpoints(write_grid, tmp_path, ray_tmp):
    rounds = 24
    grid_path = write_grid(name="node-fault", sau={"eps": [0.1, 0.2], "rounds": rounds})
    specs = {s.trial_id for s in expand(load_grid(grid_path))}
    storage = tmp_path / "sweep"
    # The head runs the driver only; every trial runs on worker A until its raylet dies, then on worker B.
    cluster = LocalCluster(ray_tmp, head_cpus=0, head_ip="127.0.0.11")
    driver = None
    try:
        worker_a = cluster.add_worker("127.0.0.12", cpus=2)
        driver = subprocess.Popen(
            [sys.executable, "-c", "import sys; from orchestrator.cli import main; sys.exit(main(sys.argv[1:]))",
             "run", str(grid_path), "--storage", str(storage), "--address", cluster.address],
            env={**cluster.env, "PYTHONPATH": str(REPO)}, start_new_session=True,
            stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT)
        # Kill once every trial has checkpointed (logged rounds up to an evaluation) and none has finished.
        deadline = time.monotonic() + 420
        while True:
            before = logged_rounds(storage)
            if len(before) == len(specs) and all(2 <= len(h) < rounds for _, h in before.values()):
                break
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()
            time.sleep(0.5)
        (raylet,) = [p for p in session_pids(worker_a.pid) if process_name(p) == "raylet"]
        os.kill(raylet, signal.SIGKILL)
        killed_at = time.time()
        cluster.add_worker("127.0.0.13", cpus=2)
        assert driver.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        cluster.stop()

    df = read_results(storage)
    assert sorted(df["trial_id"]) == sorted(specs)  # one row per trial: none lost, none twice
    client, runs = child_runs(storage)
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in runs) == sorted(specs)  # one run per trial
    for run in runs:
        trial_id = run.data.tags[TRIAL_ID_TAG]
        row = df[df["trial_id"] == trial_id].iloc[0]
        assert run.info.status == "FINISHED" and row["rounds_done"] == rounds
        # Continued, not restarted: the run the killed attempt logged into, each round logged once, the rounds
        # up to the checkpoint before the kill and the rest after it.
        run_before, history_before = before[trial_id]
        assert run.info.run_id == run_before == row["mlflow_run_id"]
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, rounds + 1))
        resumed_from = max(m.step for m in history if m.timestamp < killed_at * 1000)
        assert resumed_from >= len(history_before) >= 2
        assert all(m.timestamp > killed_at * 1000 for m in history if m.step > resumed_from)
    # Tune's own record: each trial reported from worker A, then (retried) from worker B.
    results = [json.loads(line) for p in (storage / "tune").glob("*/*/result.json")
               for line in p.read_text().splitlines()]
    for trial_id in specs:
        nodes = [r["node_ip"] for r in results if r["trial"] == trial_id]
        assert nodes[0] == "127.0.0.12" and nodes[-1] == "127.0.0.13", nodes
