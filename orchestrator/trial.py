"""One SAU trial, a pure function of its spec: purify a stored backdoored model, evaluate it, write its row.

Nothing here imports Ray: Ray schedules a trial, it does not define it. Every eval_every rounds (and after
the last) the trial evaluates, sends its metrics to MLflow and checkpoints to
storage/checkpoints/<trial_id>/state.pt; a trial that finds that file continues from it.
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

from backdoor import Metrics, clean_subset, der, eval_sets, evaluate, load_record, to_unit
from sau_kernel import Progress, purify

from .inputs import shared_dataset
from .results import read_row, write_row
from .spec import TrialSpec
from .tracking import SweepTracking, TrialTracker


def checkpoint_path(storage: Path, trial_id: str) -> Path:
    return storage / "checkpoints" / trial_id / "state.pt"


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _after(before: Metrics, after: Metrics) -> dict[str, float]:
    return {**{f"{k}_after": v for k, v in asdict(after).items()}, "der": der(before, after)}


def run_trial(spec: TrialSpec, storage: Path, tracking: SweepTracking | None,
              report: Callable[[dict], None] | None = None) -> dict:
    """Run the trial `spec` on the model in storage/models/<model_key>; write and return its result row.

    `report` receives, after every round, the round's losses and the latest evaluated metrics under the
    row's names (acc_after, asr_after, ra_after, der; before the first evaluation: the model's own)."""
    done = read_row(storage / "results", spec.trial_id)
    if done is not None:  # finished by another attempt: a repeated search sample, or one that outlived its sweep
        if report is not None:
            report({"round": done["rounds_done"], **{k: done[k] for k in ("acc_after", "asr_after", "ra_after",
                                                                             "der")}})
        return done
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, attack, record = load_record(storage / "models" / spec.model_key)
    data = shared_dataset(spec.dataset.name, spec.dataset.root, spec.dataset.download)
    sets = eval_sets(data, attack)
    index = clean_subset(len(data.x_train), spec.clean_ratio, spec.seed)
    before = Metrics(**record.metrics)
    cfg = spec.sau_config()

    path = checkpoint_path(storage, spec.trial_id)
    state = torch.load(path, weights_only=True) if path.exists() else None
    tracker = TrialTracker(tracking, spec.trial_id, spec.flat(), run_id=state and state["mlflow_run_id"])
    latest = state["latest"] if state else _after(before, before)
    seconds_before = state["seconds"] if state else 0.0  # spent by earlier, interrupted attempts

    def on_round(progress: Progress) -> None:
        nonlocal latest
        log = progress.log
        losses = {"loss": log.loss, "clean": log.clean, "at": log.at, "sar": log.sar}
        tracker.log(log.round, losses)
        if log.round % spec.eval_every == 0 or log.round == cfg.rounds:
            after = evaluate(progress.model, sets, device=device)
            latest = _after(before, after)
            tracker.log(log.round, asdict(after))
            tracker.flush()  # before the checkpoint: a rerun of these rounds is then never logged twice
            _save(path, {"purify": progress.state_dict(), "mlflow_run_id": tracker.run_id, "latest": latest,
                         "seconds": seconds_before + time.perf_counter() - start})
        if report is not None:
            report({"round": log.round, **losses, **latest})

    result = purify(model, to_unit(data.x_train[index]), data.y_train[index], cfg, device=device,
                    on_round=on_round, resume=state and state["purify"])
    row = {"trial_id": spec.trial_id, "grid": spec.grid, **spec.flat(),
           **{f"{k}_before": v for k, v in asdict(before).items()}, **latest,
           "seconds_sau": sum(h.seconds for h in result.history),
           "seconds_total": seconds_before + time.perf_counter() - start,
           "rounds_done": len(result.history),
           "device": f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu",
           "torch_version": torch.__version__, "sau_version": version("sau-orchestrator"),
           "mlflow_run_id": tracker.run_id, "finished_at": datetime.now(timezone.utc)}
    write_row(storage / "results", row)
    final = {k: row[k] for k in ("acc_before", "asr_before", "ra_before", *latest, "seconds_sau", "seconds_total")}
    tracker.log(len(result.history), final, final=True)
    history = "round,loss,clean,at,sar,seconds\n" + "".join(
        f"{h.round},{h.loss},{h.clean},{h.at},{h.sar},{h.seconds}\n" for h in result.history)
    tracker.finish({"history.csv": history, "row.json": json.dumps(row, default=str, indent=1)})
    shutil.rmtree(path.parent, ignore_errors=True)
    return row
