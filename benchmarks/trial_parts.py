"""What a trial spends outside SAU, part by part, in one process without Ray: the load benchmark's tiny trial
(digits, BadNets, cnn-small) with the default MLflow store (sqlite).

    PYTHONPATH=. python benchmarks/trial_parts.py --out benchmarks/results/trial_parts.json

Each part is the mean of 5 calls in milliseconds (the MLflow experiment's creation: 1 call), on one torch
thread as in a trial.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

from backdoor import TrainRecipe, eval_sets, evaluate, load_dataset, load_record, make_attack, train_record
from orchestrator.inputs import shared_dataset
from orchestrator.results import read_row, write_row
from orchestrator.tracking import TrialTracker, open_sweep


def mean_ms(make, calls: int = 5):
    start = time.perf_counter()
    for _ in range(calls):
        result = make()
    return round((time.perf_counter() - start) / calls * 1000, 1), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a trial: Ray gives a 1-CPU trial OMP_NUM_THREADS=1
    work = Path(tempfile.mkdtemp(prefix="sau-parts-"))
    data = load_dataset("digits")
    attack = make_attack("badnets", {}, data.shape, data.num_classes)
    train_record(data, attack, "cnn-small", TrainRecipe(epochs=1, lr=0.05, batch_size=64), 0, work / "model")
    parts = {}
    parts["load_dataset (digits)"], _ = mean_ms(lambda: load_dataset("digits"))
    shared_dataset("digits", None, False)
    parts["shared_dataset, cached"], _ = mean_ms(lambda: shared_dataset("digits", None, False))
    parts["load_record"], (model, attack, _) = mean_ms(lambda: load_record(work / "model"))
    parts["eval_sets"], sets = mean_ms(lambda: eval_sets(data, attack))
    evaluate(model, sets, device=torch.device("cpu"))  # the first call initialises torch's kernels
    parts["evaluate"], _ = mean_ms(lambda: evaluate(model, sets, device=torch.device("cpu")))
    parts["version(sau-orchestrator)"], _ = mean_ms(lambda: version("sau-orchestrator"))
    parts["MLflow experiment and parent run (first call creates the store)"], tracking = mean_ms(
        lambda: open_sweep(f"sqlite:///{work}/mlflow.db", "parts", "parts", work / "artifacts"), calls=1)
    params = {f"param{i}": i for i in range(30)}

    def tracked_trial() -> None:
        tracker = TrialTracker(tracking, f"trial-{time.perf_counter()}", params)
        for step in (1, 2):
            tracker.log(step, {"loss": 1.0, "clean": 1.0, "at": 0.0, "sar": 1.0})
        tracker.log(2, {"acc": 0.9, "asr": 0.1, "ra": 0.8})
        tracker.flush()
        tracker.log(2, {"acc_after": 0.9}, final=True)
        tracker.finish({"history.csv": "round,loss\n1,1.0\n2,1.0\n", "row.json": "{}"})

    parts["MLflow child run: create, 1 flush, finish with 2 artifacts"], _ = mean_ms(tracked_trial)
    row = {"trial_id": "t", **{f"column{i}": 0.5 for i in range(40)}}
    parts["write_row"], _ = mean_ms(lambda: write_row(work / "results", row))
    parts["read_row (a row that exists)"], _ = mean_ms(lambda: read_row(work / "results", "t"))
    result = {"benchmark": "trial_parts", "command": " ".join(["python", *sys.argv]), "unit": "ms",
              "conditions": {"nproc": os.cpu_count(), "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
                             "torch_threads": torch.get_num_threads(),
                             "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
              "parts": parts}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
