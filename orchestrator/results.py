"""Result rows: one Parquet file per finished trial, read back as one pandas table."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from defenses import DEFENSES

BEFORE_AFTER = ("acc", "asr", "ra")  # shown as before→after
# Columns rows written before they existed lack: those rows are SAU trials that ran to the end, and the code
# version that made them is unknown.
FILLED = {"defense": "sau", "status": "finished", "code_version": "unrecorded"}


class ResultsError(ValueError):
    """Results that cannot be read or shown; the message is one line."""


def read_row(results_dir: Path, trial_id: str) -> dict | None:
    """The row of `trial_id`, or None if it has none."""
    path = Path(results_dir) / f"{trial_id}.parquet"
    return pq.read_table(path).to_pylist()[0] if path.exists() else None


def write_row(results_dir: Path, row: dict) -> Path:
    """Write `row` to results_dir/<trial_id>.parquet atomically: a crash leaves no partial row."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{row['trial_id']}.parquet"
    # A leading dot and no .parquet suffix hide the temp file from us and from pyarrow's dataset reader.
    fd, tmp = tempfile.mkstemp(dir=results_dir, prefix=f".{row['trial_id']}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(pa.Table.from_pylist([row]), tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def finished_ids(results_dir: Path) -> set[str]:
    """Ids of the trials that have a row in results_dir (empty if it does not exist)."""
    return {p.stem for p in Path(results_dir).glob("*.parquet")}


def read_results(path: Path) -> pd.DataFrame:
    """All rows under a storage dir (its results/), a results dir, or one .parquet file."""
    path = Path(path)
    if not path.exists():
        raise ResultsError(f"{path}: no such file or directory")
    if path.is_file():
        files = [path]
    else:
        files = sorted((path / "results" if (path / "results").is_dir() else path).glob("*.parquet"))
    if not files:
        raise ResultsError(f"{path}: no results (expected {path}/results/*.parquet)")
    try:
        tables = [pq.read_table(f) for f in files]
    except (OSError, pa.ArrowException) as e:
        raise ResultsError(f"{path}: cannot read results: {e}") from None
    # Rows written at different times may differ in column set or type (null vs str, int vs float).
    df = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    for column, value in FILLED.items():
        df[column] = df[column].fillna(value) if column in df else value
    return df


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
