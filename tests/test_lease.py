"""The sweep driver's lease on a storage: Lease on a local directory, from lease.json files as another driver
leaves them, and two `sau run` drivers on one storage as a user starts them. (On an object store:
test_object_storage.py.)"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from processes import REPO, SAU, kill_session, sau, session_pids
from test_cli import assert_user_error

from orchestrator import lease
from orchestrator.lease import NAME, TTL_S, Lease
from orchestrator.storage import Storage, StorageError


def own_start_ticks() -> int:
    return int((Path("/proc/self/stat").read_text().rpartition(")")[2].split())[19])


def write_record(directory: Path, age: float = 0.0, **fields) -> dict:
    """lease.json as a driver leaves it, last renewed `age` seconds ago, with `fields` replaced."""
    record = {"host": "other-host", "pid": 4242, "start_ticks": 1234, "started": "2026-01-02T03:04:05Z",
              "renewed": time.time() - age, "token": "theirs", **fields}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / NAME).write_text(json.dumps(record))
    return record


@pytest.mark.parametrize("fields", [
    {},  # another host, renewed just now
    {"age": TTL_S / 2},
    {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": own_start_ticks()},  # a process that runs
])
def test_a_live_holder_is_refused_with_resume_too(tmp_path, fields):
    record = write_record(tmp_path, **fields)
    for resume in (False, True):
        with pytest.raises(StorageError) as error:
            Lease(Storage(tmp_path), resume).acquire(print)
        assert str(error.value) == (f"{tmp_path}: in use by the sweep of host {record['host']}, pid {record['pid']}, "
                                    f"started {record['started']}; wait for it to end or stop it")
    assert json.loads((tmp_path / NAME).read_text()) == record


@pytest.mark.parametrize("fields", [
    {"age": TTL_S + 1},  # another host that stopped renewing
    {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": own_start_ticks() + 1},  # a reused pid
])
def test_a_dead_holder_is_taken_over_with_resume_only(tmp_path, fields):
    record = write_record(tmp_path, **fields)
    storage = Storage(tmp_path)
    with pytest.raises(StorageError) as error:
        Lease(storage, resume=False).check()
    assert str(error.value) == (f"{tmp_path}: its lease was left by a sweep driver that is gone (host {record['host']}, "
                                f"pid {record['pid']}, started {record['started']}); pass --resume to take it over "
                                "and continue that sweep")
    lines = []
    ours = Lease(storage, resume=True)
    ours.acquire(lines.append)
    assert lines == [f"took over the lease on {tmp_path} from a sweep driver that is gone (host {record['host']}, "
                     f"pid {record['pid']}, started {record['started']})"]
    held = json.loads((tmp_path / NAME).read_text())
    assert (held["host"], held["pid"], held["start_ticks"]) == (socket.gethostname(), os.getpid(), own_start_ticks())
    with pytest.raises(StorageError, match="in use by the sweep of"):  # held by a live driver now
        Lease(storage, resume=True).check()
    ours.release()
    assert not (tmp_path / NAME).exists()


def test_the_lease_is_renewed_until_released(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    ours = Lease(Storage(tmp_path), resume=False)
    ours.acquire(print)
    first = json.loads((tmp_path / NAME).read_text())
    deadline = time.monotonic() + 60
    while json.loads((tmp_path / NAME).read_text())["renewed"] == first["renewed"]:
        assert time.monotonic() < deadline, "the lease was not renewed"
        time.sleep(0.05)
    assert {**json.loads((tmp_path / NAME).read_text()), "renewed": 0} == {**first, "renewed": 0}
    ours.release()
    assert not (tmp_path / NAME).exists()
    assert not any(thread.name == "sau-lease" for thread in threading.enumerate())  # stopped with the lease


def test_release_leaves_a_lease_another_driver_took_over(tmp_path):
    ours = Lease(Storage(tmp_path), resume=False)
    ours.acquire(print)
    theirs = write_record(tmp_path)  # (no renewal falls in this test: the first is RENEW_S away)
    ours.release()
    assert json.loads((tmp_path / NAME).read_text()) == theirs


def test_create_writes_only_where_there_is_nothing(tmp_path):
    storage = Storage(tmp_path / "sweep")
    assert storage.create("lease.json", b"first") and not storage.create("lease.json", b"second")
    assert storage.read("lease.json") == b"first" and os.listdir(tmp_path / "sweep") == ["lease.json"]


def test_an_unreadable_lease_is_one_line(tmp_path):
    write_record(tmp_path)
    record = json.loads((tmp_path / NAME).read_text())
    del record["pid"]
    (tmp_path / NAME).write_text(json.dumps(record))
    with pytest.raises(StorageError) as error:
        Lease(Storage(tmp_path), resume=True).check()
    assert str(error.value) == (f"{tmp_path / NAME}: not a lease record (no field 'pid'); delete it if no sweep "
                                "runs on this storage")


def snapshot(directory: Path) -> list:
    return sorted((str(p), p.stat().st_mtime_ns) for p in directory.rglob("*"))


def freeze_session(sid: int) -> None:
    """SIGSTOP every process of session `sid`, again until no new one appeared (a process may fork meanwhile)."""
    stopped: set[int] = set()
    while new := set(session_pids(sid)) - stopped:
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= new


def test_a_second_driver_is_refused_while_the_first_runs_and_takes_over_once_it_is_killed(write_grid, tmp_path):
    path = write_grid(name="leased")
    storage = tmp_path / "sweep"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    first = subprocess.Popen([*SAU, "run", str(path), "--storage", str(storage)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # guards against a hang only
        while not (storage / "sweep.json").exists():  # written after the lease, once the sweep has started
            assert first.poll() is None and time.monotonic() < deadline, "the first sweep ended before it was seen"
            time.sleep(0.2)
        # Frozen, the first driver still runs however long the second takes to start, and writes nothing.
        freeze_session(first.pid)
        record = json.loads((storage / NAME).read_text())
        assert record["pid"] == first.pid
        before = snapshot(storage)
        for resume in ([], ["--resume"]):
            second = sau("run", str(path), "--storage", str(storage), *resume)
            assert_user_error(second, f"error: {storage}: in use by the sweep of host {socket.gethostname()}, "
                                      f"pid {first.pid}, started {record['started']}; wait for it to end or stop it")
            assert second.stdout == ""
        assert snapshot(storage) == before  # nothing written by the second driver
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        kill_session(first.pid)  # Ray's processes outlive a killed driver
        first.wait()

    refused = sau("run", str(path), "--storage", str(storage))
    assert_user_error(refused, f"its lease was left by a sweep driver that is gone (host {socket.gethostname()}, "
                               f"pid {first.pid}, started {record['started']}); pass --resume")
    assert snapshot(storage) == before
    resumed = sau("run", str(path), "--storage", str(storage), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (f"took over the lease on {storage} from a sweep driver that is gone (host {socket.gethostname()}, "
            f"pid {first.pid}, started {record['started']})") in resumed.stdout.splitlines()
    counts = re.search(r"leased: (\d+) trials to run, (\d+) already finished", resumed.stdout)
    assert counts and int(counts[1]) + int(counts[2]) == 1, resumed.stdout
    assert len(list((storage / "results").glob("*.parquet"))) == 1
    assert not (storage / NAME).exists()
