"""The quick-start search with and without ASHA: trials per hour and the best DER found, same budget.

Runs experiments/quickstart-search.yaml twice on a local Ray instance, each in a fresh storage directory: as
it is, then with `scheduler: {name: asha, grace_rounds: 5, reduction_factor: 2}` (rounds 10, eval_every 5:
ASHA compares trials at round 5). The budget is the same: the same number of sampled points, from the same
Optuna sampler and seed, the same rounds per trial, the same concurrency, the same backdoored model (trained
once, before both runs, outside the timing). It writes the figures and the command to OUT/asha_search.json.

    PYTHONPATH=. python benchmarks/asha_search.py --out benchmarks/results/asha_search_cpu.json [--smoke]

--smoke: 3 samples of 4 rounds (eval_every 2, grace_rounds 2), to check that it runs.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray

from orchestrator.spec import GridSpec, expand, load_grid
from orchestrator.storage import Storage
from orchestrator.store import ensure_models
from orchestrator.sweep import run_sweep

GRID = Path(__file__).resolve().parents[1] / "experiments" / "quickstart-search.yaml"


def variant(grid: GridSpec, smoke: bool, asha: bool) -> GridSpec:
    data = grid.model_dump()
    data["defenses"] = [{"name": d["name"], **d["params"]} for d in data["defenses"]]
    data["search"].pop("defense")
    if smoke:
        data["sau"] = {**data["sau"], "rounds": 4}
        data["eval_every"] = 2
        data["search"]["num_samples"] = 3
    if asha:
        data["search"]["scheduler"] = {"name": "asha", "grace_rounds": data["eval_every"], "reduction_factor": 2}
    return GridSpec.model_validate(data)


def measure(grid: GridSpec, models: Path, work: Path) -> dict:
    storage = work / ("asha" if grid.search.scheduler else "plain")
    (storage / "models").mkdir(parents=True)
    for entry in models.iterdir():  # the same backdoored model, trained once
        shutil.copytree(entry, storage / "models" / entry.name)
    start = time.perf_counter()
    df = run_sweep(grid, storage=storage, resume=False, address=None, tracking_uri=None, out=lambda line: None)
    seconds = time.perf_counter() - start
    finished = df[df["status"] == "finished"]
    best = finished.loc[finished["der"].idxmax()]
    return {"scheduler": grid.search.scheduler.model_dump() if grid.search.scheduler else None,
            "trials": len(df), "finished": len(finished), "stopped": int((df["status"] == "stopped").sum()),
            "rounds_run": int(df["rounds_done"].sum()), "seconds": seconds, "trials_per_hour": len(df) * 3600 / seconds,
            "best_der": float(best["der"]), "best_trial": {k: best[k] for k in ("trial_id", "acc_after", "asr_after")},
            "rows": df[["trial_id", "status", "rounds_done", "acc_after", "asr_after", "der"]].to_dict("records")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--smoke", action="store_true", help="3 samples of 4 rounds")
    args = parser.parse_args()
    grid = load_grid(GRID)
    plain, asha = variant(grid, args.smoke, asha=False), variant(grid, args.smoke, asha=True)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            ensure_models(expand(plain), Storage(work / "models"), plain.resources, out=lambda line: None)
            results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "grid": str(GRID.name),
                       "smoke": args.smoke, "num_samples": plain.search.num_samples,
                       "rounds": expand(plain)[0].params["rounds"], "objectives": [
                           o.model_dump() for o in plain.search.objectives],
                       "without_asha": measure(plain, work / "models", work),
                       "with_asha": measure(asha, work / "models", work)}
    finally:
        ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str) + "\n")
    for name in ("without_asha", "with_asha"):
        r = results[name]
        print(f"{name}: {r['trials']} trials ({r['stopped']} stopped) in {r['seconds']:.0f} s, "
              f"{r['trials_per_hour']:.0f} trials/h, best DER {r['best_der']:.3f}")


if __name__ == "__main__":
    main()
