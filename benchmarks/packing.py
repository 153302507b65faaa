"""Packing small SAU trials on one GPU: trials per hour at 1, 2, 4 and 8 concurrent trials, each its own process
sharing the device (as Ray Tune runs trials with fractional `gpu` resources).

Needs torch and torchvision only (no Ray, MLflow or Optuna), so it runs on a bare GPU machine:

    PYTHONPATH=. python benchmarks/packing.py --out-dir OUT [--arch cnn-small --concurrency 1 --concurrency 8]
    PYTHONPATH=. python benchmarks/packing.py --smoke --out-dir OUT    # the same code, tiny, on the CPU

Each process builds the architecture (random weights: the cost does not depend on them), draws random images
of the paper's clean set (2,500 at 32x32), and runs `--rounds` rounds of SAU with the paper's settings in
`--mode`. Processes start together; throughput is all their rounds over the wall time from the first start of
a purification to the last end (process start-up and CUDA context creation left out), expressed as paper
trials (100 rounds) per hour. OUT/packing.json has, per architecture and concurrency, that figure, each
process's seconds, and the gain over the first concurrency listed (one trial at a time by default).
"""

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from backdoor import build_model, to_unit
from gpu_costs import random_data
from sau_kernel import SAUConfig, purify

PAPER_ROUNDS = 100
ARCHS = ("cnn-small", "mobilenet_v3_large", "efficientnet_b3")


def worker(arch: str, clean: int, size: int, rounds: int, cfg: SAUConfig, device: str) -> dict:
    """One trial's purification; returns its wall-clock start and end (seconds since the epoch)."""
    data = random_data(clean, size, 10)
    model = build_model(arch, 10, 3, data.mean, data.std)
    x, y = to_unit(data.x_train), data.y_train
    if device == "cuda":
        torch.cuda.init()
    else:
        torch.set_num_threads(1)  # the smoke run's processes share the CPU as packed trials share a GPU
    start = time.time()
    purify(model, x, y, dataclasses.replace(cfg, rounds=rounds), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"start": start, "end": time.time()}


def run_packed(arch: str, concurrency: int, args) -> dict:
    command = [sys.executable, __file__, "--worker", arch, "--out-dir", args.out_dir, "--rounds", str(args.rounds),
               "--mode", args.mode, *(["--smoke"] if args.smoke else [])]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(concurrency)]
    spans = []
    for process in processes:
        output, _ = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"packing: a {arch} worker failed (exit {process.returncode})")
        spans.append(json.loads(output.strip().splitlines()[-1]))
    wall = max(s["end"] for s in spans) - min(s["start"] for s in spans)
    return {"wall_s": wall, "process_s": [s["end"] - s["start"] for s in spans],
            "trials_per_hour": concurrency * args.rounds / PAPER_ROUNDS * 3600 / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, help="directory for packing.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--arch", action="append", choices=ARCHS, help="architectures (default: all three)")
    parser.add_argument("--concurrency", action="append", type=int, help="concurrent trials (default: 1 2 4 8)")
    parser.add_argument("--rounds", type=int, help="rounds each trial runs (default 10; 2 with --smoke)")
    parser.add_argument("--mode", choices=("reference", "fast"), default="fast", help="SAU path (default fast)")
    parser.add_argument("--worker", metavar="ARCH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.smoke else 10)
    device = "cpu" if args.smoke else "cuda"
    clean, size = (32, 8) if args.smoke else (2_500, 32)
    cfg = SAUConfig(mode=args.mode, **({"pgd_steps": 2, "batch_size": 16} if args.smoke else {}))
    if args.worker:
        print(json.dumps(worker(args.worker, clean, size, args.rounds, cfg, device)))
        return
    results = {"environment": {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                               "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
                               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
               "sizes": {"clean": clean, "image": size, "rounds": args.rounds, "sau": dataclasses.asdict(cfg)},
               "packing": {}}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for arch in args.arch or (("cnn-small",) if args.smoke else ARCHS):
        per_arch = results["packing"][arch] = {}
        for concurrency in args.concurrency or ((1, 2) if args.smoke else (1, 2, 4, 8)):
            per_arch[str(concurrency)] = run_packed(arch, concurrency, args)
            per_arch[str(concurrency)]["gain"] = (per_arch[str(concurrency)]["trials_per_hour"]
                                                  / next(iter(per_arch.values()))["trials_per_hour"])
            print(f"{arch} x{concurrency}: {per_arch[str(concurrency)]['trials_per_hour']:.1f} trials/h", flush=True)
            (out / "packing.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
