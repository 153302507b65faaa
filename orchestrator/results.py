"""Result rows: one Parquet object per finished trial in a storage, read back as one pandas table.

A row is written with page checksums and read back with them verified; Parquet's footer makes a torn file
unreadable. A row that does not read back whole is no finished trial: it is set aside and its trial runs again.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from defenses import DEFENSES

from .storage import Corrupt, Storage, StorageError

BEFORE_AFTER = ("acc", "asr", "ra")  # shown as before→after
# Columns rows written before they existed lack: those rows are SAU trials that ran to the end, and the code
# version that made them is unknown.
FILLED = {"defense": "sau", "status": "finished", "code_version": "unrecorded"}


class ResultsError(ValueError):
    """Results that cannot be read or shown; the message is one line."""


def _at(where: Storage | str | os.PathLike) -> Storage:
    return where if isinstance(where, Storage) else Storage(where)


def _parquet(row: dict) -> bytes:
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist([row]), buffer, write_page_checksum=True)
    return buffer.getvalue().to_pybytes()


def _table(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data), page_checksum_verification=True)


def _row(results: Storage, name: str) -> pa.Table | None:
    """The row stored as `name`, or None where there is none or it does not read back whole (set aside)."""
    data = results.read(name)
    if data is None:
        return None
    try:
        table = _table(data)
        if table.num_rows != 1:
            raise Corrupt(f"{table.num_rows} rows, expected one")
        return table
    except (pa.ArrowException, OSError, Corrupt) as error:
        results.set_aside(name, f"unreadable row ({str(error).splitlines()[0]})", "its trial runs again")
        return None


def row_table(results: Storage | str | os.PathLike, trial_id: str) -> pa.Table | None:
    """The row of `trial_id` as stored, or None if it has none (or none that reads back whole)."""
    return _row(_at(results), f"{trial_id}.parquet")


def read_row(results: Storage | str | os.PathLike, trial_id: str) -> dict | None:
    """The row of `trial_id` (FILLED where it lacks a column), or None if it has none (or none that reads back
    whole)."""
    table = row_table(results, trial_id)
    return None if table is None else row_dict(table)


def row_dict(row: pa.Table) -> dict:
    """A stored row as a dict, FILLED where it lacks a column."""
    return {**FILLED, **row.to_pylist()[0]}


def write_row(results: Storage | str | os.PathLike, row: dict) -> str:
    """Write `row` as results/<trial_id>.parquet, whole or not at all; returns where it went."""
    results = _at(results)
    name = f"{row['trial_id']}.parquet"
    results.write(name, _parquet(row))
    return results.location(name)


def finished_rows(results: Storage | str | os.PathLike) -> dict[str, pa.Table]:
    """The rows in `results` that read back whole, by trial id (none if it does not exist)."""
    results = _at(results)
    rows = {name.removesuffix(".parquet"): _row(results, name) for name in results.names(".parquet")}
    return {trial_id: row for trial_id, row in rows.items() if row is not None}


def frame(rows: list[pa.Table]) -> pd.DataFrame:
    """Rows as one table; a column some rows lack is FILLED where it has a default."""
    # Rows written at different times may differ in column set or type (null vs str, int vs float).
    df = pa.concat_tables(rows, promote_options="permissive").to_pandas()
    for column, value in FILLED.items():
        df[column] = df[column].fillna(value) if column in df else value
    return df


def read_results(path: Storage | str | os.PathLike) -> pd.DataFrame:
    """All rows under a storage (its results/), a results directory, or one .parquet file; a path or a URI."""
    try:
        where = _at(path)
        if not where.exists():
            raise ResultsError(f"{path}: no such file or directory")
        if where.is_file():
            blobs = [where.read("")]
        else:
            results = where / "results" if (where / "results").exists() else where
            blobs = [results.read(name) for name in results.names(".parquet")]
        if not blobs:
            raise ResultsError(f"{path}: no results (expected {path}/results/*.parquet)")
        tables = [_table(blob) for blob in blobs]
    except (OSError, pa.ArrowException, StorageError) as e:
        raise ResultsError(f"{path}: cannot read results: {str(e).splitlines()[0]}") from None
    return frame(tables)


def parameter_columns(df: pd.DataFrame) -> list[str]:
    """The columns of attack and defense parameters, and clean_ratio."""
    prefixes = ("attack.", *(f"{name}." for name in DEFENSES))
    return [c for c in df.columns if c.startswith(prefixes) or c == "clean_ratio"]


def format_table(df: pd.DataFrame, fmt: str = "md") -> str:
    """`csv`: every column. `md`: a compact markdown table of what varies and the metrics."""
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt != "md":
        raise ResultsError(f"unknown table format {fmt!r} (expected md or csv)")
    # Blanks do not make a column vary: they are the parameters other attacks lack.
    # A status column only where some trial did not finish (ASHA stopped it).
    swept = [c for c in parameter_columns(df) if df[c].nunique() > 1] + (["status"] if "status" in df and
                                                                          df["status"].nunique() > 1 else [])
    df = df.sort_values(["attack", "arch", "defense", *swept, "seed"], kind="stable")
    header = ["trial", "attack", "arch", "defense", "seed", *swept, "ACC", "ASR", "RA", "DER"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for _, r in df.iterrows():
        cells = [r["trial_id"][:8], r["attack"], r["arch"], r["defense"], r["seed"], *(r[c] for c in swept)]
        cells = [_cell(v) for v in cells]
        cells += [f"{100 * r[f'{m}_before']:.1f}→{100 * r[f'{m}_after']:.1f}" for m in BEFORE_AFTER]
        cells.append(f"{r['der']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:g}"
    return str(value)


def pareto_front(df: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    """Rows no other row dominates (at least as good in every objective, better in one); rows with
    a missing objective value are left out."""
    if not objectives:
        raise ResultsError("pareto_front: no objectives given")
    for column, mode in objectives:
        if column not in df.columns:
            raise ResultsError(f"objective {column}: no such column")
        if mode not in ("max", "min"):
            raise ResultsError(f"objective {column}: mode must be max or min, got {mode!r}")
    df = df.dropna(subset=[c for c, _ in objectives])
    # Negate minimised objectives so that larger is better in every column.
    v = np.column_stack([df[c].to_numpy(float) * (1 if m == "max" else -1) for c, m in objectives])
    geq = (v[:, None, :] >= v[None, :, :]).all(axis=2)
    gt = (v[:, None, :] > v[None, :, :]).any(axis=2)
    dominated = (geq & gt).any(axis=0)
    return df[~dominated]
