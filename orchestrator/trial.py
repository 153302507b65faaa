"""One trial, a pure function of its spec: purify a stored backdoored model with a defense, evaluate it, write its row.

Nothing here imports Ray: Ray schedules a trial, it does not define it. Every eval_every rounds the trial
evaluates, sends its metrics to MLflow and checkpoints to storage/checkpoints/<trial_id>/state.pt; a trial that
finds that file continues from it. After the last round it evaluates (if that round was not an evaluation round)
and writes its row, status `finished`; a trial a scheduler stops leaves the row of its last checkpoint, status
`stopped` (write_stopped_row).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch

from backdoor import CODE_VERSION, Metrics, clean_subset, der, eval_sets, evaluate, load_dataset, load_record, to_unit
from defenses import DEFENSES
from sau_kernel import Progress, RoundLog

from .results import read_row, write_row
from .spec import TrialSpec
from .tracking import SweepTracking, TrialTracker

METRICS = ("acc_after", "asr_after", "ra_after", "der")


def checkpoint_path(storage: Path, trial_id: str) -> Path:
    return storage / "checkpoints" / trial_id / "state.pt"


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _after(before: Metrics, after: Metrics) -> dict[str, float]:
    return {**{f"{k}_after": v for k, v in asdict(after).items()}, "der": der(before, after)}


def _history_csv(history: list[RoundLog]) -> str:
    return "round,loss,clean,at,sar,seconds\n" + "".join(
        f"{h.round},{h.loss},{h.clean},{h.at},{h.sar},{h.seconds}\n" for h in history)


def _close(storage: Path, row: dict, history: list[RoundLog], tracker: TrialTracker) -> dict:
    """Write `row` (stamped now), send its figures to the trial's MLflow run and end it; drop the checkpoint."""
    row = {**row, "finished_at": datetime.now(timezone.utc)}
    write_row(storage / "results", row)
    final = {k: row[k] for k in ("acc_before", "asr_before", "ra_before", *METRICS, "seconds_sau", "seconds_total")}
    tracker.log(row["rounds_done"], final, final=True)
    tracker.finish({"history.csv": _history_csv(history), "row.json": json.dumps(row, default=str, indent=1)},
                   "FINISHED" if row["status"] == "finished" else "KILLED")
    shutil.rmtree(checkpoint_path(storage, row["trial_id"]).parent, ignore_errors=True)
    return row


def run_trial(spec: TrialSpec, storage: Path, tracking: SweepTracking | None,
              report: Callable[[dict], None] | None = None) -> dict:
    """Run the trial `spec` on the model in storage/models/<model_key>; write and return its result row.

    `report` receives, after every round, the round's losses and the latest evaluated metrics under the
    row's names (acc_after, asr_after, ra_after, der; before the first evaluation: the model's own), and once
    more the row's own figures when it is written."""
    row = read_row(storage / "results", spec.trial_id)
    if row is None:  # else finished by another attempt: a repeated search sample, or one that outlived its sweep
        row = _run(spec, storage, tracking, report)
    if report is not None:
        report({"round": row["rounds_done"], **{k: row[k] for k in METRICS}})
    return row


def _run(spec: TrialSpec, storage: Path, tracking: SweepTracking | None,
         report: Callable[[dict], None] | None) -> dict:
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, attack, record = load_record(storage / "models" / spec.model_key)
    data = load_dataset(spec.dataset.name, root=spec.dataset.root, download=spec.dataset.download)
    sets = eval_sets(data, attack)
    # A defense that uses no clean data gets an empty set.
    index = slice(0) if spec.clean_ratio is None else clean_subset(len(data.x_train), spec.clean_ratio, spec.seed)
    before = Metrics(**record.metrics)
    defense, cfg = DEFENSES[spec.defense], spec.config()

    path = checkpoint_path(storage, spec.trial_id)
    state = torch.load(path, weights_only=True) if path.exists() else None
    tracker = TrialTracker(tracking, spec.trial_id, spec.flat(), run_id=state and state["mlflow_run_id"],
                           run_name=f"{spec.defense}-{spec.trial_id}")
    latest = state["latest"] if state else _after(before, before)
    evaluated = state["purify"]["round"] if state else 0  # the round `latest` was measured at
    seconds_before = state["seconds"] if state else 0.0  # spent by earlier, interrupted attempts
    device_name = f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"

    def row(history: list[RoundLog], status: str) -> dict:
        return {"trial_id": spec.trial_id, "grid": spec.grid, **spec.flat(),
                **{f"{k}_before": v for k, v in asdict(before).items()}, **latest,
                "seconds_sau": sum(h.seconds for h in history),
                "seconds_total": seconds_before + time.perf_counter() - start,
                "rounds_done": len(history), "status": status, "device": device_name,
                "torch_version": str(torch.__version__), "sau_version": version("sau-orchestrator"),
                "code_version": CODE_VERSION, "mlflow_run_id": tracker.run_id}

    def evaluate_at(net: torch.nn.Module, round_index: int) -> None:
        nonlocal latest, evaluated
        after = evaluate(net, sets, device=device)
        latest, evaluated = _after(before, after), round_index
        tracker.log(round_index, asdict(after))

    def on_round(progress: Progress) -> None:
        log = progress.log
        losses = {"loss": log.loss, "clean": log.clean, "at": log.at, "sar": log.sar}
        tracker.log(log.round, losses)
        if log.round % spec.eval_every == 0:
            evaluate_at(progress.model, log.round)
            tracker.flush()  # before the checkpoint: a rerun of these rounds is then never logged twice
            # The row this trial leaves if it is stopped here (write_stopped_row).
            _save(path, {"purify": progress.state_dict(), "mlflow_run_id": tracker.run_id, "latest": latest,
                         "seconds": seconds_before + time.perf_counter() - start,
                         "stopped_row": row(progress.history, "stopped")})
        if report is not None:
            report({"round": log.round, **losses, **latest})

    x_clean, y_clean = to_unit(data.x_train[index]), data.y_train[index]
    result = defense.purify(model, x_clean, y_clean, cfg, device=device, on_round=on_round,
                            resume=state and state["purify"])
    if result.history and evaluated != result.history[-1].round:
        evaluate_at(result.model, result.history[-1].round)
    return _close(storage, row(result.history, "finished"), result.history, tracker)


def write_stopped_row(storage: Path, trial_id: str, tracking: SweepTracking | None) -> dict | None:
    """The row of a trial a scheduler stopped, marked `stopped`, with what it reached at its last evaluation
    (from its checkpoint); its MLflow run ends KILLED. None if the trial has a row already or no checkpoint."""
    path = checkpoint_path(storage, trial_id)
    if read_row(storage / "results", trial_id) is not None or not path.exists():
        return None
    state = torch.load(path, weights_only=True)
    row = state["stopped_row"]
    tracker = TrialTracker(tracking, trial_id, {}, run_id=state["mlflow_run_id"] or None)
    return _close(storage, row, [RoundLog(**h) for h in state["purify"]["history"]], tracker)
