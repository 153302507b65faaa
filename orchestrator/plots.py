"""Figures of a sweep, as PNG and SVG: metrics against one setting (a line per attack, mean ± std band over seeds),
the Pareto front of a two-objective search, and per-round curves of chosen trials (from their MLflow runs)."""

from __future__ import annotations

import io
import os

import pandas as pd
# Figures without pyplot: no GUI backend and no global figure registry, so nothing needs a display or closing.
from matplotlib.figure import Figure

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # see tracking.py
from mlflow import MlflowClient  # noqa: E402

from .results import ResultsError, pareto_front  # noqa: E402
from .storage import Storage  # noqa: E402
from .tables import varying_axes  # noqa: E402

TERMS = {"loss": "total (weighted)", "clean": "clean CE", "at": "adversarial CE", "sar": "shared adversarial (SAR)"}
SIZE = (6.4, 4.0)  # inches; at DPI, 640 x 400 pixels per panel
DPI = 100
RATES = ("acc_after", "asr_after", "ra_after", "acc_before", "asr_before", "ra_before", "clean_ratio")
LABELS = {"acc_after": "ACC after defense (%)", "asr_after": "ASR after defense (%)",
          "ra_after": "RA after defense (%)", "der": "DER (%)", "acc_before": "ACC before defense (%)",
          "asr_before": "ASR before defense (%)", "ra_before": "RA before defense (%)",
          "clean_ratio": "clean data (% of the training set)",
          "eps": "ε (L∞ bound of the perturbation, pixel values in [0, 1])", "lr": "learning rate",
          "rounds": "rounds", "lmd_sar": "λ_SAR (weight of the shared adversarial loss)",
          "lmd_at": "λ_AT (weight of adversarial training)", "lmd_clean": "λ_clean (weight of clean CE)"}


def _label(column: str) -> str:
    return LABELS.get(column, LABELS.get(column.rpartition(".")[2], column))


def _scale(column: str) -> float:
    """Rates are shown in %."""
    return 100.0 if column in RATES or column == "der" else 1.0


def _save(fig, out: Storage, name: str) -> list[str]:
    """`fig` as <name>.png and <name>.svg in `out`; returns where they went."""
    places = []
    for kind in ("png", "svg"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=kind, dpi=DPI)
        out.write(f"{name}.{kind}", buffer.getvalue())
        places.append(out.location(f"{name}.{kind}"))
    return places


def x_column(df: pd.DataFrame, x: str) -> list[str]:
    """The columns an --x names: itself if it is one, else <defense>.<x> for every defense that has it."""
    if x in df.columns:
        return [x]
    columns = [c for c in df.columns if c.partition(".")[2] == x and not c.startswith(("attack.", "train."))]
    if not columns:
        raise ResultsError(f"--x {x}: no such column or defense parameter in these rows")
    return columns


def against(df: pd.DataFrame, x: str, ys: list[str], out: Storage) -> list[str]:
    """One panel per metric in `ys` against `x`: a line per attack (per attack and defense when several
    defenses have `x`, and per value of any other varying axis), mean ± std over seeds as a band."""
    columns = x_column(df, x)
    for y in ys:
        if y not in df.columns:
            raise ResultsError(f"--y {y}: no such column")
    fig = Figure(figsize=(SIZE[0] * len(ys), SIZE[1]))
    axes = fig.subplots(1, len(ys), squeeze=False)
    rows = df.dropna(subset=columns, how="all")
    several = rows["defense"].nunique() > 1
    for defense, mine in rows.groupby("defense", sort=False):
        column = next(c for c in columns if mine[c].notna().all())
        # Every other axis this defense varies splits lines: a mean is only over seeds.
        others = [c for c in varying_axes(mine) if c != column and mine[c].notna().all()]
        for name, group in mine.groupby(["attack", *others], sort=True):
            label = " · ".join([name[0], *([defense] if several else []),
                                *(f"{c.rpartition('.')[2]}={v:g}" for c, v in zip(others, name[1:]))])
            for ax, y in zip(axes[0], ys):
                stats = group.groupby(column)[y].agg(["mean", "std"]).sort_index()
                xs = stats.index.to_numpy(float) * _scale(column)
                mean, std = stats["mean"] * _scale(y), stats["std"].fillna(0) * _scale(y)
                line, = ax.plot(xs, mean, marker="o", label=label)
                ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    seeds = df["seed"].nunique()
    for ax, y in zip(axes[0], ys):
        ax.set_xlabel(_label(columns[0]))
        ax.set_ylabel(_label(y))
        ax.set_title(f"{_label(y).removesuffix(' (%)')} against {x.replace('_', ' ')}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small", title=f"mean ± std over {seeds} seed{'s' * (seeds > 1)}",
                       title_fontsize="small", loc="best")
    fig.tight_layout()
    return _save(fig, out, f"{x}-" + "-".join(ys))


def pareto(df: pd.DataFrame, objectives: list[tuple[str, str]], out: Storage) -> list[str]:
    """Every trial of a two-objective search as a point, the Pareto front highlighted."""
    if len(objectives) != 2:
        raise ResultsError("a Pareto plot needs two objectives")
    (a, mode_a), (b, mode_b) = objectives
    front = pareto_front(df, objectives).sort_values(a)
    fig = Figure(figsize=SIZE)
    ax = fig.subplots()
    ax.scatter(df[a] * _scale(a), df[b] * _scale(b), color="0.6", label=f"all trials ({len(df)})")
    ax.plot(front[a] * _scale(a), front[b] * _scale(b), color="C3", marker="o", drawstyle="steps-post",
            label=f"Pareto front ({len(front)})")
    ax.set_xlabel(f"{_label(a)}, {mode_a}imised")
    ax.set_ylabel(f"{_label(b)}, {mode_b}imised")
    ax.set_title("Search trials and their Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    return _save(fig, out, "pareto")


def rounds(tracking_uri: str, rows: pd.DataFrame, out: Storage) -> list[str]:
    """Per trial of `rows`: its loss terms at every round, and ACC/ASR at every evaluation (from MLflow)."""
    client = MlflowClient(tracking_uri)
    paths = []
    for _, row in rows.iterrows():
        if not row.get("mlflow_run_id"):
            raise ResultsError(f"trial {row['trial_id']}: no MLflow run recorded, so no per-round history")
        history = {key: client.get_metric_history(row["mlflow_run_id"], key)
                   for key in ("loss", "clean", "at", "sar", "acc", "asr")}
        fig = Figure(figsize=(2 * SIZE[0], SIZE[1]))
        left, right = fig.subplots(1, 2)
        for key in ("loss", "clean", "at", "sar"):
            points = sorted((m.step, m.value) for m in history[key])
            if points and any(v for _, v in points):  # a term the defense does not have stays at 0
                left.plot(*zip(*points), label=TERMS[key])
        left.set(xlabel="round", ylabel="loss (mean over the clean subset)", title="Loss terms per round")
        for key, label in (("acc", "ACC"), ("asr", "ASR")):  # round 0: the backdoored model
            points = [(0, 100 * row[f"{key}_before"])] + sorted((m.step, 100 * m.value) for m in history[key])
            right.plot(*zip(*points), marker="o", label=label)
        right.set(xlabel="round (0: before the defense)", ylabel="rate (%)", title="ACC and ASR at each evaluation",
                  ylim=(-2, 102))
        for ax in (left, right):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best")
        fig.suptitle(f"{row['defense']} on {row['attack']} ({row['arch']}, seed {row['seed']}), "
                     f"trial {row['trial_id'][:8]}")
        fig.tight_layout()
        paths += _save(fig, out, f"rounds-{row['trial_id'][:8]}")
    return paths


def sweep_figures(df: pd.DataFrame, objectives: list[tuple[str, str]], tracking_uri: str | None,
                  out: Storage) -> list[str]:
    """The figures attached to a sweep's parent run: ACC and ASR against each numeric defense setting that
    varies, the Pareto front of a two-objective search, and the per-round curves of each defense's best trial
    (by DER) when the sweep was tracked."""
    df = df[df["status"] == "finished"]
    paths = []
    for column in varying_axes(df):
        if not column.startswith("attack.") and df[column].dtype.kind in "if":
            paths += against(df, column.partition(".")[2] or column, ["acc_after", "asr_after"], out)
    if len(objectives) == 2 and len(df):
        paths += pareto(df, objectives, out)
    if tracking_uri is not None:
        ran = df[(df["rounds_done"] > 0) & df["mlflow_run_id"].astype(bool)]
        best = ran.sort_values("der", ascending=False).drop_duplicates("defense")
        paths += rounds(tracking_uri, best, out)
    return paths
