"""One trial, a pure function of its spec: purify a stored backdoored model with a defense, evaluate it, write its row.

Nothing here imports Ray: Ray schedules a trial, it does not define it. Every eval_every rounds (and after
the last) the trial evaluates, sends its metrics to MLflow and checkpoints to a new object
storage/checkpoints/<trial_id>/state-<round>.pt (a checked object: its checksum is verified on load); a trial
that finds one continues from the newest that loads, and sets aside any newer one that does not.
A trial writes its round history (history/<trial_id>.csv), then its row (results/<trial_id>.parquet): a row
that exists means a trial that ended. It is `finished` when it ran all its rounds, `diverged` when its losses
stopped being finite (no figures after), and a trial a scheduler stops leaves the row of its last checkpoint,
status `stopped` (write_stopped_row).
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, fields
from datetime import datetime, timezone
from importlib.metadata import version
from typing import Callable

import torch

from backdoor import CODE_VERSION, Metrics, clean_subset, der, eval_sets, evaluate, load_record, to_unit
from defenses import DEFENSES
from sau_kernel import Diverged, Progress, RoundLog

from .inputs import shared_dataset
from .results import read_row, write_row
from .spec import TrialSpec
from .storage import Storage
from .store import fetch_record
from .tracking import SweepTracking, TrialTracker

METRICS = tuple(f.name for f in fields(Metrics))
AFTER = (*(f"{m}_after" for m in METRICS), "der")  # what `report` gets at every round, the latest evaluation's
# The columns of a row beside the trial's parameters (spec.flat()); FINAL also go to MLflow as final metrics.
FINAL = (*(f"{m}_before" for m in METRICS), *AFTER, "seconds_sau", "seconds_total")
OUTCOME = ("trial_id", "grid", *FINAL, "rounds_done", "status", "device", "torch_version", "sau_version",
           "code_version", "mlflow_run_id", "finished_at")
HISTORY_COLUMNS = ("round", "loss", "clean", "at", "sar", "seconds", *METRICS)


def row_params(row: dict) -> dict:
    """The trial's parameters (spec.flat()) among the columns of its own row."""
    return {k: v for k, v in row.items() if k not in OUTCOME}


def load_checkpoint(checkpoints: Storage) -> dict | None:
    """The newest checkpoint in `checkpoints` that loads, or None; one that does not is set aside."""
    for name in reversed(_checkpoint_names(checkpoints)):
        try:
            data = checkpoints.read_checked(name)
            if data is None:
                continue  # removed since it was listed
            return torch.load(io.BytesIO(data), weights_only=True)
        except OSError:  # the storage did not answer: nothing is known about the checkpoint
            raise
        except Exception as error:  # noqa: BLE001 - Corrupt, or any of the errors torch.load raises on bad bytes
            checkpoints.set_aside(name, f"unreadable checkpoint ({str(error).splitlines()[0]})",
                                  "the trial continues from the checkpoint before it, or from round 0")
    return None


def _checkpoint_names(checkpoints: Storage) -> list[str]:
    """Oldest first: the names carry the round, zero-padded."""
    return [name for name in checkpoints.names(".pt") if name.startswith("state-")]


def save_checkpoint(checkpoints: Storage, state: dict) -> None:
    """Store `state` as a new object named after its round, then drop the older ones."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    name = f"state-{state['purify']['round']:06d}.pt"
    checkpoints.write_checked(name, buffer.getvalue())
    for old in _checkpoint_names(checkpoints):
        if old < name:
            checkpoints.delete(old)


def history_csv(history: list, evaluated: dict[int, dict]) -> str:
    """One line per round: its losses and seconds, and its ACC, ASR, RA where the trial evaluated."""
    lines = [",".join(HISTORY_COLUMNS)]
    for h in history:
        metrics = evaluated.get(h.round, {})
        lines.append(",".join(str(v) for v in (h.round, h.loss, h.clean, h.at, h.sar, h.seconds,
                                                *(metrics.get(m, "") for m in METRICS))))
    return "\n".join(lines) + "\n"


def _after(before: Metrics, after: Metrics) -> dict[str, float]:
    return {**{f"{k}_after": v for k, v in asdict(after).items()}, "der": der(before, after)}


def _close(storage: Storage, row: dict, history: str, tracker: TrialTracker) -> dict:
    """Write the trial's history, then `row` (stamped now), send its figures to the trial's MLflow run and end
    it; drop the checkpoints. The history goes first: a row that exists has its history beside it, for `sau sync`."""
    row = {**row, "finished_at": datetime.now(timezone.utc)}
    (storage / "history").write(f"{row['trial_id']}.csv", history.encode())
    write_row(storage / "results", row)
    tracker.log(row["rounds_done"], {k: row[k] for k in FINAL}, final=True)
    tracker.finish({"history.csv": history, "row.json": json.dumps(row, default=str, indent=1)},
                   stopped=row["status"] == "stopped")
    (storage / "checkpoints" / row["trial_id"]).delete_tree()
    return row


def run_trial(spec: TrialSpec, storage: Storage, tracking: SweepTracking | None,
              report: Callable[[dict], None] | None = None) -> dict:
    """Run the trial `spec` on the model in storage/models/<model_key>; write and return its result row.

    `report` receives, after every round, the round's losses and the latest evaluated metrics under the
    row's names (acc_after, asr_after, ra_after, der; before the first evaluation: the model's own), and once
    more the row's own figures and status when it is written."""
    row = read_row(storage / "results", spec.trial_id)
    if row is None:  # else finished by another attempt: a repeated search sample, or one that outlived its sweep
        row = _run(spec, storage, tracking, report)
    if report is not None:
        report({"round": row["rounds_done"], **{k: row[k] for k in AFTER}, "status": row["status"]})
    return row


def _run(spec: TrialSpec, storage: Storage, tracking: SweepTracking | None,
         report: Callable[[dict], None] | None) -> dict:
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, attack, record = load_record(fetch_record(storage / "models" / spec.model_key))
    data = shared_dataset(spec.dataset.name, spec.dataset.root, spec.dataset.download)
    sets = eval_sets(data, attack)
    # A defense that uses no clean data gets an empty set.
    index = slice(0) if spec.clean_ratio is None else clean_subset(len(data.x_train), spec.clean_ratio, spec.seed)
    before = Metrics(**record.metrics)
    defense, cfg = DEFENSES[spec.defense], spec.config()

    checkpoints = storage / "checkpoints" / spec.trial_id
    state = load_checkpoint(checkpoints)
    tracker = TrialTracker(tracking, spec.trial_id, spec.flat(), run_id=state and state["mlflow_run_id"],
                           run_name=f"{spec.defense}-{spec.trial_id}")
    latest = state["latest"] if state else _after(before, before)
    seconds_before = state["seconds"] if state else 0.0  # spent by earlier, interrupted attempts
    evaluated = state["evaluated"] if state else {}  # round -> ACC, ASR, RA
    device_name = f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"

    def row(history: list[RoundLog], status: str) -> dict:
        return {"trial_id": spec.trial_id, "grid": spec.grid, **spec.flat(),
                **{f"{k}_before": v for k, v in asdict(before).items()}, **latest,
                "seconds_sau": sum(h.seconds for h in history),
                "seconds_total": seconds_before + time.perf_counter() - start,
                "rounds_done": len(history), "status": status, "device": device_name,
                "torch_version": str(torch.__version__), "sau_version": version("sau-orchestrator"),
                "code_version": CODE_VERSION, "mlflow_run_id": tracker.run_id}

    def on_round(progress: Progress) -> None:
        nonlocal latest
        log = progress.log
        losses = {"loss": log.loss, "clean": log.clean, "at": log.at, "sar": log.sar}
        tracker.log(log.round, losses)
        # A defense that reports rounds has `rounds`; `none` reports none.
        if log.round % spec.eval_every == 0 or log.round == cfg.rounds:
            after = evaluate(progress.model, sets, device=device)
            latest = _after(before, after)
            evaluated[log.round] = asdict(after)
            tracker.log(log.round, asdict(after))
            tracker.flush()  # before the checkpoint: a rerun of these rounds is then never logged twice
            # With the row this trial leaves if it is stopped here (write_stopped_row).
            save_checkpoint(checkpoints, {
                "purify": progress.state_dict(), "mlflow_run_id": tracker.run_id, "latest": latest,
                "evaluated": evaluated, "seconds": seconds_before + time.perf_counter() - start,
                "stopped_row": row(progress.history, "stopped")})
        # The last round is reported with the row, once it is written (run_trial): a scheduler's rung at the
        # last round could otherwise stop a trial that ran all its rounds, and its row would say `stopped`.
        if report is not None and log.round < cfg.rounds:
            report({"round": log.round, **losses, **latest})

    try:
        result = defense.purify(model, to_unit(data.x_train[index]), data.y_train[index], cfg, device=device,
                                on_round=on_round, resume=state and state["purify"])
        history, status = result.history, "finished"
    except Diverged as diverged:  # recorded with no figures after: a destroyed model's would look like a result
        history, status = diverged.history, "diverged"
        latest = {key: math.nan for key in latest}
    return _close(storage, row(history, status), history_csv(history, evaluated), tracker)


def write_stopped_row(storage: Storage, trial_id: str, tracking: SweepTracking | None) -> dict | None:
    """The row of a trial a scheduler stopped, marked `stopped`, with what it reached at its last evaluation
    (from its checkpoint); its MLflow run ends KILLED. None if the trial has a row already or no checkpoint."""
    if read_row(storage / "results", trial_id) is not None:
        return None
    state = load_checkpoint(storage / "checkpoints" / trial_id)
    if state is None:
        return None
    tracker = TrialTracker(tracking, trial_id, {}, run_id=state["mlflow_run_id"] or None)
    history = [RoundLog(**h) for h in state["purify"]["history"]]
    return _close(storage, state["stopped_row"], history_csv(history, state["evaluated"]), tracker)
