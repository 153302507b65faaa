import io
import math
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator import storage
from orchestrator.results import (ResultsError, finished_rows, format_table, pareto_front, read_results, read_row,
                                 write_row)


def row(trial_id, eps=0.1, seed=0, acc=(0.972, 0.951), asr=(1.0, 0.02), ra=(0.0, 0.9), der=0.979, **extra):
    return {"trial_id": trial_id, "grid": "g", "dataset": "digits", "attack": "badnets", "attack.patch_size": 3,
            "arch": "cnn-small", "seed": seed, "clean_ratio": 0.2, "sau.eps": eps, "sau.lr": 0.01,
            "sau.train_bn": False, "acc_before": acc[0], "acc_after": acc[1], "asr_before": asr[0],
            "asr_after": asr[1], "ra_before": ra[0], "ra_after": ra[1], "der": der, "rounds_done": 10,
            "mlflow_run_id": None, **extra}


def test_round_trip_with_mixed_types(tmp_path):
    results_dir = tmp_path / "results"
    first = write_row(results_dir, row("a" * 16))
    write_row(results_dir, row("b" * 16, eps=0.2, mlflow_run_id="run-7"))
    assert first == str(results_dir / f"{'a' * 16}.parquet")
    df = read_results(tmp_path)  # a storage dir: reads its results/
    assert len(df) == 2 and list(df["trial_id"]) == ["a" * 16, "b" * 16]
    back = df.iloc[1].to_dict()
    for key, value in row("b" * 16, eps=0.2, mlflow_run_id="run-7").items():
        assert back[key] == value, key
    assert df["seed"].dtype.kind == "i" and df["sau.train_bn"].dtype.kind == "b"
    assert df["mlflow_run_id"].isna().tolist() == [True, False]
    assert len(read_results(results_dir)) == 2 and len(read_results(first)) == 1
    assert sorted(os.listdir(results_dir)) == [f"{'a' * 16}.parquet", f"{'b' * 16}.parquet"]


def test_rewrite_replaces_the_row(tmp_path):
    write_row(tmp_path, row("a" * 16, der=0.5))
    write_row(tmp_path, row("a" * 16, der=0.7))
    assert read_results(tmp_path)["der"].tolist() == [0.7]


def test_crash_before_rename_leaves_no_row(tmp_path, monkeypatch):
    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between writing the temp file and renaming it

    monkeypatch.setattr(storage.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_row(tmp_path, row("a" * 16))
    assert set(finished_rows(tmp_path)) == set()
    with pytest.raises(ResultsError):
        read_results(tmp_path)


def test_temp_files_are_invisible(tmp_path):
    write_row(tmp_path, row("a" * 16))
    # What a killed writer leaves behind: a complete Parquet file under write_row's temp name.
    pq.write_table(pa.Table.from_pylist([row("b" * 16)]), tmp_path / f".{'b' * 16}.x1y2z3.tmp")
    assert set(finished_rows(tmp_path)) == {"a" * 16}
    assert read_results(tmp_path)["trial_id"].tolist() == ["a" * 16]
    assert pd.read_parquet(tmp_path)["trial_id"].tolist() == ["a" * 16]  # as a pyarrow data set, too


def test_a_torn_row_is_no_finished_trial_and_is_set_aside(tmp_path, capfd):
    write_row(tmp_path, row("a" * 16))
    write_row(tmp_path, row("b" * 16))
    torn = tmp_path / f"{'b' * 16}.parquet"
    torn.write_bytes(torn.read_bytes()[:-12])  # a writer that died mid-file: no footer
    assert set(finished_rows(tmp_path)) == {"a" * 16}
    (line,) = capfd.readouterr().err.splitlines()
    assert line.startswith(f"warning: {torn}: unreadable row (") and line.endswith(
        f"set aside as {tmp_path / '_corrupt' / torn.name}; its trial runs again")
    assert (tmp_path / "_corrupt" / torn.name).is_file() and not torn.exists()
    assert read_row(tmp_path, "b" * 16) is None and set(finished_rows(tmp_path)) == {"a" * 16}
    assert pd.read_parquet(tmp_path)["trial_id"].tolist() == ["a" * 16]  # pyarrow's data sets skip _corrupt/


def test_no_results(tmp_path):
    assert set(finished_rows(tmp_path / "missing")) == set()
    with pytest.raises(ResultsError) as info:
        read_results(tmp_path)
    assert str(info.value) == f"{tmp_path}: no results (expected {tmp_path}/results/*.parquet)"


def test_format_table_md_shows_what_varies(tmp_path):
    for i, (eps, seed) in enumerate([(0.2, 1), (0.1, 1), (0.2, 0), (0.1, 0)]):
        write_row(tmp_path, row(f"{i}{'0' * 15}", eps=eps, seed=seed))
    table = format_table(read_results(tmp_path)).splitlines()
    assert table[0] == "| trial | attack | arch | defense | seed | sau.eps | ACC | ASR | RA | DER |"
    assert table[1] == "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    assert table[2] == "| 30000000 | badnets | cnn-small | sau | 0 | 0.1 | 97.2→95.1 | 100.0→2.0 | 0.0→90.0 | 0.979 |"
    assert [line.split(" | ")[0] for line in table[2:]] == ["| 30000000", "| 10000000", "| 20000000", "| 00000000"]


def test_format_table_csv_has_every_column(tmp_path):
    write_row(tmp_path, row("a" * 16))
    df = read_results(tmp_path)
    back = pd.read_csv(io.StringIO(format_table(df, "csv")))
    assert list(back.columns) == list(df.columns) and back["sau.eps"].tolist() == [0.1]
    with pytest.raises(ResultsError, match="unknown table format"):
        format_table(df, "html")


def test_pareto_front():
    df = pd.DataFrame({"acc_after": [0.90, 0.95, 0.85, 0.80, 0.90, 0.99, math.nan],
                       "asr_after": [0.10, 0.50, 0.05, 0.20, 0.10, 0.60, 0.00]},
                      index=["a", "b", "c", "d", "e", "f", "g"])
    front = pareto_front(df, [("acc_after", "max"), ("asr_after", "min")])
    assert set(front.index) == {"a", "b", "c", "e", "f"}  # d is dominated by a; g has no accuracy
    assert set(pareto_front(df, [("acc_after", "max")]).index) == {"f"}
    assert set(pareto_front(df, [("acc_after", "min"), ("asr_after", "max")]).index) == {"b", "d", "f"}
    with pytest.raises(ResultsError, match="mode must be max or min"):
        pareto_front(df, [("acc_after", "up")])


def test_read_row_returns_the_row_of_one_trial_or_none(tmp_path):
    row = {"trial_id": "abc123", "attack": "badnets", "defense": "ft", "status": "stopped", "code_version": "1",
           "acc_after": 0.5, "rounds_done": 3}
    write_row(tmp_path, row)
    assert read_row(tmp_path, "abc123") == row
    assert read_row(tmp_path, "missing") is None
    # A row written before `defense`, `status` and `code_version` existed reads as read_results shows it.
    old = {"trial_id": "old", "attack": "badnets", "acc_after": 0.5, "rounds_done": 3}
    write_row(tmp_path, old)
    assert read_row(tmp_path, "old") == {**old, "defense": "sau", "status": "finished", "code_version": "unrecorded"}
