"""Hundreds of trials through `sau run`: wall time, trials per minute, the driver's peak memory, the overhead
per trial outside SAU and the fixed cost per sweep.

    PYTHONPATH=. python benchmarks/load.py --case tiny --out benchmarks/results/load_tiny300.json
    PYTHONPATH=. python benchmarks/load.py --case noop --out benchmarks/results/load_noop1000.json
    PYTHONPATH=. python benchmarks/load.py --smoke          # both cases with 6 trials, a minute or two

Cases (digits, BadNets, cnn-small, one backdoored model, one seed; the trials differ in `eps` only):
  tiny  300 trials of 2 SAU rounds on 20% of the training images (287), evaluated after round 2;
  noop  1,000 trials of 1 round with 1 PGD step on 1% of them (14 images): trials that do almost nothing.

`sau run` runs as a child process with its own Ray temp dir (a local Ray instance, `cpu: 1` per trial, so as
many concurrent trials as Ray sees cores) and the default MLflow store (sqlite in the storage directory).
The driver's resident memory (VmRSS of that process) is sampled every 0.2 s; stage 1 ends when the model
record's files are written (their mtime); a row's time is its `finished_at`.

Figures (seconds unless named otherwise):
  wall                   process start to exit
  startup                process start to the line "N trials to run" (imports, ray.init, MLflow experiment)
  stage1                 that line to the model record's last file (training the one backdoored model)
  warmup                 stage 1's end to the first row, less that trial's own seconds_total (Tune start)
  fixed_cost             startup + warmup + shutdown: what a sweep costs beyond its trials and stage 1
  shutdown               the last row to process exit (results table, parent run, ray.shutdown)
  seconds_per_trial      (last row - first row) / (trials - 1) x concurrency: wall one trial slot takes
  overhead_per_trial     seconds_per_trial - mean seconds_sau: everything a trial costs outside SAU
  in_trial_overhead      mean (seconds_total - seconds_sau): loading, evaluating, inside the trial function
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "tiny": {"trials": 300, "sau": {"rounds": 2, "clean_ratio": 0.2, "batch_size": 64, "lr": 0.001}, "eval_every": 2},
    "noop": {"trials": 1000, "sau": {"rounds": 1, "clean_ratio": 0.01, "batch_size": 64, "lr": 0.001,
                                     "pgd_steps": 1}, "eval_every": 1},
}
SMOKE_TRIALS = 6


def grid(case: str, trials: int) -> dict:
    c = CASES[case]
    return {
        "name": f"load-{case}",
        "dataset": {"name": "digits"},
        "attacks": [{"name": "badnets"}],
        "archs": ["cnn-small"],
        "attack_training": {"epochs": 3, "lr": 0.05, "batch_size": 64},
        # One axis of `trials` distinct eps values: every trial costs the same.
        "sau": {**c["sau"], "eps": [round(0.1 + 0.0002 * i, 4) for i in range(trials)]},
        "seeds": [0],
        "eval_every": c["eval_every"],
        "resources": {"cpu": 1, "gpu": 0},
    }


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def conditions() -> dict:
    load = os.getloadavg()
    return {"nproc": os.cpu_count(), "loadavg_1_5_15": [round(x, 2) for x in load],
            "python": platform.python_version(), "platform": platform.platform(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def mlflow_runs(storage: Path) -> dict[str, int]:
    """Child runs of the sweep's parent run in the default store, by status."""
    from mlflow import MlflowClient

    info = json.loads((storage / "sweep.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    counts: dict[str, int] = {}
    token = None
    while True:
        page = client.search_runs([info["experiment_id"]], f"tags.`mlflow.parentRunId` = '{info['parent_run_id']}'",
                                  max_results=1000, page_token=token)
        for run in page:
            counts[run.info.status] = counts.get(run.info.status, 0) + 1
        token = page.token
        if not token:
            return counts


def run_case(case: str, trials: int, work: Path, env_extra: dict[str, str]) -> dict:
    import pyarrow.parquet as pq

    grid_path = work / f"{case}.yaml"
    grid_path.write_text(yaml.safe_dump(grid(case, trials), sort_keys=False))
    storage = work / f"{case}-storage"
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp, **env_extra}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "orchestrator.cli", "run", str(grid_path), "--storage", str(storage)]
    lines: list[tuple[float, str]] = []
    samples: list[tuple[float, int]] = []  # (time, resident bytes)
    loads: list[float] = []
    t0 = time.time()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def sample() -> None:
        while proc.poll() is None:
            try:
                samples.append((time.time(), rss_bytes(proc.pid)))
                loads.append(os.getloadavg()[0])
            except (OSError, ValueError):
                break
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        lines.append((time.time(), line.rstrip("\n")))
    rc = proc.wait()
    t_end = time.time()
    sampler.join()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if rc != 0:
        tail = "\n".join(text for _, text in lines[-30:])
        raise SystemExit(f"sau run exited {rc}:\n{tail}")

    t_init = next(t for t, text in lines if "trials to run" in text)
    t_stage1 = max(p.stat().st_mtime for p in (storage / "models").rglob("*") if p.is_file())
    files = sorted((storage / "results").glob("*.parquet"))
    rows = [pq.read_table(f).to_pylist()[0] for f in files]
    rows.sort(key=lambda r: r["finished_at"])
    done = [r["finished_at"].timestamp() for r in rows]
    first, last = done[0], done[-1]
    concurrency = os.cpu_count()  # cpu: 1 per trial on a local instance with one CPU per core
    sau = sum(r["seconds_sau"] for r in rows) / len(rows)
    total = sum(r["seconds_total"] for r in rows) / len(rows)
    per_trial = (last - first) / (len(rows) - 1) * concurrency
    startup, stage1 = t_init - t0, t_stage1 - t_init
    warmup = first - t_stage1 - rows[0]["seconds_total"]
    shutdown = t_end - last
    peak_at, peak = max(samples, key=lambda sample: sample[1])
    runs = mlflow_runs(storage)
    return {
        "case": case, "trials": trials, "rows": len(rows), "distinct_rows": len({r["trial_id"] for r in rows}),
        "mlflow_child_runs": runs, "concurrency": concurrency,
        "wall_s": round(t_end - t0, 2), "trials_per_min": round(len(rows) / (t_end - t0) * 60, 1),
        "steady_trials_per_min": round((len(rows) - 1) / (last - first) * 60, 1),
        "driver_peak_rss_mib": round(peak / 2**20, 1), "rss_samples": len(samples),
        # When the peak was reached, from the process start (compare startup_s, stage1_s, wall_s).
        "driver_peak_at_s": round(peak_at - t0, 2),
        "loadavg_1min_mean_during": round(sum(loads) / len(loads), 2),
        "lost": trials - len({r["trial_id"] for r in rows}) + trials - runs.get("FINISHED", 0),
        "startup_s": round(startup, 2), "stage1_s": round(stage1, 2), "warmup_s": round(warmup, 2),
        "shutdown_s": round(shutdown, 2), "fixed_cost_s": round(startup + warmup + shutdown, 2),
        "mean_seconds_sau": round(sau, 4), "mean_seconds_total": round(total, 4),
        "seconds_per_trial": round(per_trial, 4), "overhead_per_trial_s": round(per_trial - sau, 4),
        "in_trial_overhead_s": round(total - sau, 4),
        "command": " ".join(["sau", *command[3:]]), "env": env_extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: both")
    parser.add_argument("--trials", type=int, help="override the case's trial count")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_TRIALS} trials per case")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of `sau run` (to compare settings)")
    parser.add_argument("--work", help="keep the grids and storage here (default: a temp dir, removed)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    env_extra = dict(pair.split("=", 1) for pair in args.env)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sau-load-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"benchmark": "load", "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "conditions_before": conditions(), "cases": []}
    try:
        for case in args.case or sorted(CASES, reverse=True):
            trials = SMOKE_TRIALS if args.smoke else args.trials or CASES[case]["trials"]
            result = run_case(case, trials, work, env_extra)
            print(json.dumps(result), flush=True)
            results["cases"].append(result)
            if result["lost"]:
                raise SystemExit(f"{case}: trials without a row or a FINISHED MLflow run: {result['lost']}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    results["conditions_after"] = conditions()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
