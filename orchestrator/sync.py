"""`sau sync`: the MLflow runs a sweep could not create (its tracking server was down), made afterwards from
what the storage holds: each row (parameters, final metrics) and the round history beside it."""

from __future__ import annotations

import csv
import io
import json
from typing import Callable

from .results import finished_rows, row_dict
from .storage import Storage
from .tracking import ERRORS, SweepTracking, TrialTracker, find_sweep, tracked_trials
from .trial import FINAL, METRICS, row_params

LOSSES = ("loss", "clean", "at", "sar")  # logged every round, as the trial does


class SyncError(ValueError):
    """A sync that cannot start or did not create every run; one line."""


def replay(tracking: SweepTracking, row: dict, history: str | None) -> None:
    """One child run for `row`, holding what the trial would have logged, ended as the trial ends it."""
    tracker = TrialTracker(tracking, row["trial_id"], row_params(row), run_name=f"{row['defense']}-{row['trial_id']}")
    for line in csv.DictReader(io.StringIO(history or "")):
        step = int(line["round"])
        tracker.log(step, {key: float(line[key]) for key in LOSSES})
        if line.get(METRICS[0]):
            tracker.log(step, {key: float(line[key]) for key in METRICS})
    tracker.log(row["rounds_done"], {key: row[key] for key in FINAL}, final=True)
    artifacts = {"row.json": json.dumps(row, default=str, indent=1)}
    if history is not None:
        artifacts["history.csv"] = history
    tracker.finish(artifacts, stopped=row["status"] == "stopped")


def sync(storage: Storage, uri: str, out: Callable[[str], None] = print) -> int:
    """Create a run in the store at `uri` for every row of the sweep in `storage` that has none there;
    returns how many were created (0 when run again)."""
    text = storage.read("sweep.json")
    if text is None:
        raise SyncError(f"{storage}: no sweep.json (not the storage of a sweep)")
    info = json.loads(text)
    try:
        tracking = find_sweep(uri, info["grid"], info["sweep"], storage.local_dir() / "mlartifacts",
                              info["parent_run_id"] if info["tracking_uri"] == uri else None)
        have = tracked_trials(tracking)
    except ERRORS as error:
        raise SyncError(f"tracking at {uri}: {type(error).__name__}: {str(error).splitlines()[0]}") from None
    rows = finished_rows(storage / "results")
    missing = sorted(rows.keys() - have)
    for trial_id in missing:
        history = (storage / "history").read(f"{trial_id}.csv")
        replay(tracking, row_dict(rows[trial_id]), history and history.decode())
    left = len(rows.keys() - tracked_trials(tracking))
    if left:
        raise SyncError(f"tracking at {uri}: {left} of {len(missing)} runs could not be created (see the "
                        "warnings above); run sau sync again")
    out(f"{info['sweep']}: {len(missing)} runs created, {len(rows) - len(missing)} rows already had one")
    return len(missing)
