"""The paper's table: per (data set, architecture, attack), the backdoored model's ACC/ASR and each defense's
ACC, ASR, RA and DER as mean ± std over seeds, the best defense per metric in bold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from defenses import DEFENSES

from .results import ResultsError, parameter_columns

BASE_KEYS = ("dataset", "arch", "attack")
METRICS = (("acc", "ACC", "max"), ("asr", "ASR", "min"), ("ra", "RA", "max"), ("der", "DER", "max"))
FORMATS = ("md", "csv", "latex")


@dataclass(frozen=True)
class Cell:
    mean: float
    std: float  # 0 for a single seed
    n: int  # seeds

    def text(self) -> str:
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}"


@dataclass(frozen=True)
class PaperTable:
    keys: list[str]  # the columns that name a row
    defenses: list[str]  # in the registry's order; `none` is the no-defense columns
    rows: list[dict]  # key values, "no_defense": {acc, asr: Cell}, and per defense {metric: Cell} or None


def code_versions(df: pd.DataFrame) -> list[str]:
    return sorted(df["code_version"].astype(str).unique())


def select(df: pd.DataFrame, where: dict[str, object], status: str = "finished") -> pd.DataFrame:
    """Rows with `status` (or every row for "all") whose `where` columns equal the given values; a row without
    the column (a parameter its defense lacks, such as the clean_ratio of `none`) is kept."""
    if status != "all":
        df = df[df["status"] == status]
    for column, value in where.items():
        if column not in df.columns:
            raise ResultsError(f"--where {column}: no such column (columns: {', '.join(df.columns)})")
        values = df[column]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and values.dtype.kind in "if":
            match = np.isclose(values.to_numpy(float), float(value))
        else:
            match = values.astype(str) == str(value)
        df = df[match | values.isna()]
    return df


def varying_axes(df: pd.DataFrame) -> list[str]:
    """Parameter columns with more than one value (blanks do not count)."""
    return [c for c in parameter_columns(df) if df[c].nunique() > 1]


def _cell(values: pd.Series) -> Cell:
    values = values.astype(float)
    return Cell(float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0, len(values))


def _matching(df: pd.DataFrame, key: dict) -> pd.DataFrame:
    """Rows equal to `key` on every key column they have a value in."""
    for column, value in key.items():
        values = df[column]
        df = df[(values == value) | values.isna()]
    return df


def paper_table(df: pd.DataFrame, group_by: list[str] | None = None) -> PaperTable:
    """`df`: rows of one code version. Rows are named by data set, architecture and attack, then by `group_by`
    (default: every parameter axis that varies); the code version is a key too when rows hold several."""
    if df.empty:
        raise ResultsError("no rows to tabulate (with these --where and --status)")
    extra = varying_axes(df) if group_by is None else group_by
    for column in extra:
        if column not in df.columns:
            raise ResultsError(f"--group-by {column}: no such column")
    keys = [*BASE_KEYS, *(["code_version"] if df["code_version"].nunique() > 1 else []),
            *(c for c in extra if c not in BASE_KEYS)]
    present = set(df["defense"])
    defenses = [d for d in DEFENSES if d in present and not DEFENSES[d].per_model]
    # A table row per combination of key values, from the rows that have them all.
    named = df.dropna(subset=keys)
    if named.empty:
        named = df.dropna(subset=list(BASE_KEYS))
        keys = list(BASE_KEYS)
    rows = []
    for values in named[keys].drop_duplicates().sort_values(keys, kind="stable").itertuples(index=False):
        key = dict(zip(keys, values))
        matching = _matching(df, key)
        models = matching.drop_duplicates(subset=["seed"])  # the backdoored model's own figures, one per seed
        row = {**key, "no_defense": {m: _cell(models[f"{m}_before"]) for m in ("acc", "asr")}}
        for defense in defenses:
            mine = matching[matching["defense"] == defense]
            if mine["seed"].duplicated().any():
                raise ResultsError(f"{defense} on {key}: several rows per seed; add the axis that separates "
                                   "them to --group-by or fix it with --where")
            row[defense] = None if mine.empty else {
                m: _cell(mine["der"] if m == "der" else mine[f"{m}_after"]) for m, _, _ in METRICS}
        rows.append(row)
    return PaperTable(keys, defenses, rows)


def _best(row: dict, defenses: list[str]) -> dict[str, set[str]]:
    """Per metric, the defenses whose shown mean is the best of the row (ties share it)."""
    best = {}
    for metric, _, mode in METRICS:
        shown = {d: round(100 * row[d][metric].mean, 2) for d in defenses if row[d] is not None}
        if shown:
            target = max(shown.values()) if mode == "max" else min(shown.values())
            best[metric] = {d for d, v in shown.items() if v == target}
    return best


def _key_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def render(table: PaperTable, fmt: str = "md") -> str:
    """md and latex: "mean ± std" in %, best per metric and row in bold, seeds as n; csv: mean, std and n
    columns (fractions, as in the rows)."""
    if fmt not in FORMATS:
        raise ResultsError(f"unknown table format {fmt!r} (expected {', '.join(FORMATS)})")
    if fmt == "csv":
        flat = []
        for row in table.rows:
            out = {k: row[k] for k in table.keys}
            for name, cells in [("no_defense", row["no_defense"]), *((d, row[d]) for d in table.defenses)]:
                for metric, cell in (cells or {}).items():
                    out.update({f"{name}.{metric}": cell.mean, f"{name}.{metric}_std": cell.std,
                                f"{name}.{metric}_n": cell.n})
            flat.append(out)
        return pd.DataFrame(flat).to_csv(index=False)
    header = [*table.keys, "No defense ACC", "No defense ASR"]
    for d in table.defenses:
        header += [f"{d} {label}" for _, label, _ in METRICS] + [f"{d} n"]
    lines = []
    for row in table.rows:
        best = _best(row, table.defenses)
        cells = [_key_text(row[k]) for k in table.keys]
        cells += [row["no_defense"][m].text() for m in ("acc", "asr")]
        for d in table.defenses:
            if row[d] is None:
                cells += ["–"] * (len(METRICS) + 1)
                continue
            for metric, _, _ in METRICS:
                text = row[d][metric].text()
                bold = len(table.defenses) > 1 and d in best.get(metric, ())
                cells.append((f"**{text}**" if fmt == "md" else f"\\textbf{{{text}}}") if bold else text)
            cells.append(str(row[d]["acc"].n))
        lines.append(cells)
    if fmt == "md":
        out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        return "\n".join(out + ["| " + " | ".join(c) + " |" for c in lines]) + "\n"
    tex = lambda text: text.replace("_", r"\_").replace("±", r"$\pm$").replace("–", "--")  # noqa: E731
    out = [r"\begin{tabular}{" + "l" * len(table.keys) + "r" * (len(header) - len(table.keys)) + "}",
           r"\toprule", " & ".join(tex(h) for h in header) + r" \\", r"\midrule"]
    out += [" & ".join(tex(c) for c in cells) + r" \\" for cells in lines]
    return "\n".join(out + [r"\bottomrule", r"\end{tabular}"]) + "\n"
