"""MLflow for many writers: a real `mlflow server` on a real PostgreSQL 15, both on 127.0.0.1; a sweep whose
tracking server is down keeps its rows and history, and `sau sync` creates its runs afterwards, once."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from servers import wait_until_healthy

from orchestrator.spec import expand, load_grid
from orchestrator.sweep import run_sweep
from orchestrator.tracking import TRIAL_ID_TAG

REPO = Path(__file__).resolve().parents[1]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
SAU = [str(Path(sys.executable).with_name("sau"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False)
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


def sau(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SAU, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_sync_creates_the_runs_a_dead_server_missed_once(write_grid, tmp_path, mlflow_server, capfd):
    path = write_grid(name="synced", sau={"eps": [0.1, 0.2]})
    specs = {s.trial_id: s for s in expand(load_grid(path))}
    storage = tmp_path / "sweep"
    # A closed port, and the project's own retry bound (no MLFLOW_HTTP_* set by the test).
    df = run_sweep(load_grid(path), storage=storage, resume=False, address=None,
                   tracking_uri=f"http://127.0.0.1:{free_port()}", out=lambda line: None)
    assert sorted(df["trial_id"]) == sorted(specs) and set(df["mlflow_run_id"]) == {""}
    assert sum("warning: MLflow" in line for line in capfd.readouterr().err.splitlines()) >= 1

    first = sau("sync", str(storage), "--tracking-uri", mlflow_server)
    assert first.returncode == 0, first.stderr
    assert "2 runs created, 0 rows already had one" in first.stdout

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("synced")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{TRIAL_ID_TAG}` != ''")
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in runs) == sorted(specs)
    for run in runs:
        row = df[df["trial_id"] == run.data.tags[TRIAL_ID_TAG]].iloc[0]
        assert run.info.status == "FINISHED"
        assert run.data.params == {k: str(v) for k, v in specs[row["trial_id"]].flat().items()}
        for key in ("acc_before", "asr_after", "acc_after", "ra_after", "der", "seconds_sau", "seconds_total"):
            assert run.data.metrics[key] == row[key]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "asr")] == [2, 3]  # eval_every 2
        assert client.get_metric_history(run.info.run_id, "asr")[-1].value == row["asr_after"]
        assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["history.csv", "row.json"]
        history = Path(client.download_artifacts(run.info.run_id, "history.csv", str(tmp_path))).read_text()
        assert history == (storage / "history" / f"{row['trial_id']}.csv").read_text()

    second = sau("sync", str(storage), "--tracking-uri", mlflow_server)
    assert second.returncode == 0, second.stderr
    assert "0 runs created, 2 rows already had one" in second.stdout
    again = client.search_runs([experiment.experiment_id], "")
    assert len(again) == len(runs) + 1  # the trials' runs and their sweep's parent run, nothing more


def test_sync_of_a_directory_that_is_no_sweep_is_a_user_error(tmp_path):
    result = sau("sync", str(tmp_path), "--tracking-uri", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {tmp_path}: no sweep.json (not the storage of a sweep)"
