"""MLflow for many writers: a real `mlflow server` on a real PostgreSQL 15, both on 127.0.0.1; a sweep whose
tracking server is down keeps its rows and history, and `sau sync` creates its runs afterwards, once."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from processes import free_port, sau, sync_runs, wait_until_healthy

from orchestrator.results import read_results
from orchestrator.spec import expand, load_grid
from orchestrator.storage import Storage
from orchestrator.sweep import run_sweep
from orchestrator.tracking import TRIAL_ID_TAG
from orchestrator.trial import run_trial, write_stopped_row

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never another cluster on the machine
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL 15 cluster in a temp dir, run as the `postgres` user (it refuses root), on 127.0.0.1 only;
    yields the URI of its empty database `mlflow`."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL 15 is not installed ({PG_BIN}/initdb is absent)")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))  # not under pytest's root-only temp dirs
    if as_postgres:
        shutil.chown(home, "postgres", "postgres")
    port = free_port()
    pg_ctl = [*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(home / "data"), "-w"]
    try:
        subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(home / "data"), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
        subprocess.run([*pg_ctl, "-l", str(home / "log"), "-o", f"-h 127.0.0.1 -p {port} -k {home}", "start"],
                       check=True, capture_output=True)
        subprocess.run([*as_postgres, str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                        "postgres", "mlflow"], check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` with the PostgreSQL backend store and an artifact store of its own; yields its URI."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", postgres,
         "--artifacts-destination", str(tmp_path_factory.mktemp("mlflow-artifacts"))],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_healthy(server, uri, 300)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_sync_creates_the_runs_a_dead_server_missed_once(write_grid, tmp_path, mlflow_server, capfd):
    path = write_grid(name="synced", sau={"eps": [0.1, 0.2]}, defenses=["none", "ft", "sau"])
    specs = {s.trial_id: s for s in expand(load_grid(path))}
    storage = tmp_path / "sweep"
    # A closed port, and the project's own retry bound (no MLFLOW_HTTP_* set by the test).
    df = run_sweep(load_grid(path), storage=storage, resume=False, address=None,
                   tracking_uri=f"http://127.0.0.1:{free_port()}", out=lambda line: None)
    assert sorted(df["trial_id"]) == sorted(specs) and set(df["mlflow_run_id"]) == {""}
    assert sum("warning: MLflow" in line for line in capfd.readouterr().err.splitlines()) >= 1
    # A trial a scheduler stopped at round 2 (its row is written from its checkpoint, status stopped).
    stopped = next(s for s in specs.values() if s.defense == "sau").with_params(eps=0.3)

    def stop_at_two(metrics):
        if metrics["round"] == 2:
            raise SystemExit(0)  # how Ray Tune ends a function trial it stopped

    with pytest.raises(SystemExit):
        run_trial(stopped, Storage(storage), tracking=None, report=stop_at_two)
    assert write_stopped_row(Storage(storage), stopped.trial_id, tracking=None)["status"] == "stopped"
    specs[stopped.trial_id] = stopped
    rows = read_results(storage)

    runs = sync_runs(str(storage), mlflow_server, "synced", created=5, had=0)
    client = MlflowClient(mlflow_server)
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in runs) == sorted(specs)
    for run in runs:
        row = rows[rows["trial_id"] == run.data.tags[TRIAL_ID_TAG]].iloc[0]
        spec = specs[row["trial_id"]]
        assert run.info.status == ("KILLED" if row["status"] == "stopped" else "FINISHED")
        assert run.info.run_name == f"{spec.defense}-{spec.trial_id}"
        assert run.data.params == {k: str(v) for k, v in spec.flat().items()}
        for key in ("acc_before", "asr_after", "acc_after", "ra_after", "der", "seconds_sau", "seconds_total"):
            assert run.data.metrics[key] == row[key]
        rounds = list(range(1, row["rounds_done"] + 1))  # none: no rounds; the stopped trial: 2
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == rounds
        assert [m.step for m in client.get_metric_history(run.info.run_id, "asr")] == [
            r for r in rounds if r % 2 == 0 or r == 3]  # eval_every 2, and the last round
        if rounds:
            assert client.get_metric_history(run.info.run_id, "asr")[-1].value == row["asr_after"]
        assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["history.csv", "row.json"]
        history = Path(client.download_artifacts(run.info.run_id, "history.csv", str(tmp_path))).read_text()
        assert history == (storage / "history" / f"{row['trial_id']}.csv").read_text()

    again = sync_runs(str(storage), mlflow_server, "synced", created=0, had=5)
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in runs)
    experiment = client.get_experiment_by_name("synced")
    assert len(client.search_runs([experiment.experiment_id], "")) == len(runs) + 1  # and the sweep's parent run


def test_sync_of_a_directory_that_is_no_sweep_is_a_user_error(tmp_path):
    result = sau("sync", str(tmp_path), "--tracking-uri", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {tmp_path}: no sweep.json (not the storage of a sweep)"
