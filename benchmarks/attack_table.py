"""Per-attack table on real images: ACC, ASR and RA of each backdoored model before and after SAU and after
fine-tuning (ft) with the same budget, and DER.

Runs `sau attack`, then `sau purify` with each defense, for every attack (and `sau attack` for a clean model,
poison_ratio 0) on the CIFAR-10 subset in ../shared/data with cnn-small. Each command's JSON is kept in
OUT/results.json, and a step whose result is there is not run again (so an interrupted run goes on where it
stopped; `--only NAME` runs just those attacks; `--retrain` trains their models again). Writes
OUT/attack_table.md.

    python benchmarks/attack_table.py --out runs/attack-table [--only wanet --only ssba] [--retrain]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10_subset.npz"
TRAINING = ["--arch", "cnn-small", "--epochs", "30", "--lr", "0.05", "--batch-size", "64", "--no-augment"]
# One budget for both defenses: 20 rounds of Adam at lr 1e-3 over 10% of the training images, batches of 128.
BUDGET = ["--clean-ratio", "0.1", "--param", "lr=1e-3", "--param", "rounds=20", "--param", "batch_size=128"]
DEFENSES = {"purify": ["--defense", "sau", *BUDGET], "ft": ["--defense", "ft", *BUDGET]}
# Each attack with its defaults, except where a default does not take at this scale (said in the table).
ATTACKS: dict[str, list[str]] = {
    "clean": ["--attack", "badnets", "--param", "poison_ratio=0.0"],
    "badnets": ["--attack", "badnets"],
    "blended": ["--attack", "blended"],
    "sig": ["--attack", "sig"],
    "wanet": ["--attack", "wanet"],
    "wanet-s1": ["--attack", "wanet", "--param", "strength=1.0"],  # a warp twice as strong
    # Generators a quarter of BackdoorBench's size and 10 mask epochs (not 25), for the CPU.
    "inputaware": ["--attack", "inputaware", "--param", "width=16", "--param", "mask_epochs=10"],
    "lf": ["--attack", "lf"],
    "ssba": ["--attack", "ssba"],
    "trojan": ["--attack", "trojan"],
}


def sau(*args: str) -> tuple[dict, float]:
    """Run one `sau` command with --json; its JSON line and the wall time."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args, "--json"], stdout=subprocess.PIPE,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def table(results: dict) -> str:
    """The SAU table, then ACC/ASR/RA/DER after SAU and after ft side by side."""
    lines = ["| attack | settings | ACC before → after | ASR before → after | RA before → after | DER | "
             "attack s | SAU s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    both = ["", "| attack | ACC before | ASR before | SAU ACC / ASR / RA / DER | ft ACC / ASR / RA / DER | ft s |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, settings in ATTACKS.items():
        if name not in results:
            continue
        entry = results[name]
        trained, purified = entry["attack"], entry.get("purify")
        shown = " ".join(settings[2:]).replace("--param ", "") or "defaults"
        if purified is None:
            lines.append(f"| {name} | {shown} | {pct(trained['acc'])} | {pct(trained['asr'])} | "
                         f"{pct(trained['ra'])} | | {entry['attack_s']:.0f} | |")
            continue
        lines.append(
            f"| {name} | {shown} | {pct(purified['acc_before'])} → {pct(purified['acc_after'])} | "
            f"{pct(purified['asr_before'])} → {pct(purified['asr_after'])} | "
            f"{pct(purified['ra_before'])} → {pct(purified['ra_after'])} | {purified['der']:.3f} | "
            f"{entry['attack_s']:.0f} | {entry['purify_s']:.0f} |")
        if "ft" in entry:
            after = [f"{pct(r['acc_after'])} / {pct(r['asr_after'])} / {pct(r['ra_after'])} / {r['der']:.3f}"
                     for r in (purified, entry["ft"])]
            both.append(f"| {name} | {pct(purified['acc_before'])} | {pct(purified['asr_before'])} | {after[0]} | "
                        f"{after[1]} | {entry['ft_s']:.0f} |")
    return "\n".join(lines + (both if len(both) > 3 else [])) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the model records, results.json and the table")
    parser.add_argument("--only", action="append", choices=list(ATTACKS), help="run just these (repeatable)")
    parser.add_argument("--retrain", action="store_true", help="train the models of these attacks again")
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"error: {DATA} is missing: this benchmark needs the CIFAR-10 subset in ../shared/data")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name in args.only or list(ATTACKS):
        model_dir = out / name
        if args.retrain or name not in results or not (model_dir / "record.json").exists():
            if model_dir.exists():
                subprocess.run(["rm", "-rf", str(model_dir)], check=True)
            trained, attack_s = sau("attack", "--dataset", f"npz:{DATA}", *ATTACKS[name], *TRAINING,
                                    "--out", str(model_dir))
            results[name] = {"attack": trained, "attack_s": attack_s}
        entry = results[name]
        for step, options in DEFENSES.items() if name != "clean" else ():
            if step not in entry:
                entry[step], entry[f"{step}_s"] = sau("purify", str(model_dir), *options)
                results_file.write_text(json.dumps(results, indent=1))
        results_file.write_text(json.dumps(results, indent=1))
        print(f"{name}: {json.dumps(entry)}", flush=True)
    (out / "attack_table.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
