"""The storage layer on a local directory; the object-store side runs end to end in test_object_storage.py."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.storage import Storage, StorageError
from orchestrator.trial import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_whole_files_in_and_out(tmp_path):
    storage = Storage(tmp_path / "sweep")
    assert not storage.exists() and storage.read("sweep.json") is None and storage.names() == []
    storage.write("results/a.parquet", b"row a")
    results = storage / "results"
    assert results.read("a.parquet") == b"row a" and results.is_file("a.parquet") and storage.exists("results")
    assert str(results) == str(tmp_path / "sweep" / "results") == results.location()
    (tmp_path / "sweep" / "results" / ".b.parquet.x1.tmp").write_bytes(b"what a killed writer leaves")
    assert results.names(".parquet") == ["a.parquet"]
    results.write("a.parquet", b"row a, again")
    assert results.read("a.parquet") == b"row a, again"
    assert sorted(os.listdir(results.local_path)) == [".b.parquet.x1.tmp", "a.parquet"]  # no temp file of ours
    results.delete("a.parquet")
    results.delete("a.parquet")  # gone already: nothing to do
    assert results.names() == []
    results.delete_tree()
    assert not results.exists() and storage.exists()
    assert pickle.loads(pickle.dumps(storage / "models")).root == str(tmp_path / "sweep" / "models")


def test_a_relative_path_is_fixed_where_it_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Storage("runs/x").root == str(tmp_path / "runs" / "x")
    assert Storage("runs/x").local_dir() == tmp_path / "runs" / "x"


def test_an_object_store_keeps_its_local_files_in_a_cache_named_after_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage = Storage("s3://bucket/sweeps/a?endpoint_override=127.0.0.1:9&scheme=http")
    assert not storage.is_local and storage.local_path is None and storage.root == "bucket/sweeps/a"
    assert storage.local_dir() == tmp_path / "sau" / "storage" / "s3" / "bucket" / "sweeps" / "a"
    child = storage / "results"
    assert child.root == "bucket/sweeps/a/results"
    assert child.uri == "s3://bucket/sweeps/a/results?endpoint_override=127.0.0.1:9&scheme=http"
    assert storage.tune_storage()["storage_path"] == "bucket/sweeps/a/tune"


def test_an_unknown_scheme_is_a_storage_error():
    with pytest.raises(StorageError, match="storage nope://x/y"):
        Storage("nope://x/y")


def test_run_with_an_unknown_storage_scheme_is_a_user_error(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text((REPO / "experiments" / "quickstart.yaml").read_text())
    result = subprocess.run([str(Path(sys.executable).with_name("sau")), "run", str(grid), "--storage", "nope://x"],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and result.stderr.startswith("error: storage nope://x:"), result.stderr
    assert len(result.stderr.splitlines()) == 1 and sorted(tmp_path.iterdir()) == [grid]


def state(round_: int) -> dict:
    return {"purify": {"round": round_, "model": {"w": torch.full((2,), float(round_))}}, "mlflow_run_id": "r"}


def test_the_newest_checkpoint_that_loads_wins_and_older_ones_go(tmp_path):
    checkpoints = Storage(tmp_path) / "checkpoints" / "t1"
    assert load_checkpoint(checkpoints) is None
    save_checkpoint(checkpoints, state(2))
    save_checkpoint(checkpoints, state(4))
    assert checkpoints.names() == ["state-000004.pt"]  # a new object per save; the older one removed after it
    assert load_checkpoint(checkpoints)["purify"]["round"] == 4
    checkpoints.write("state-000006.pt", b"torn or corrupt")
    assert load_checkpoint(checkpoints)["purify"]["round"] == 4
    assert torch.equal(load_checkpoint(checkpoints)["purify"]["model"]["w"], torch.full((2,), 4.0))
