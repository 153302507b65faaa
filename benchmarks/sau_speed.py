"""SAU's speed on one device, side by side in one run: a BackdoorBench-style loop, the reference path
(`mode: reference`) and the fast path (`mode: fast`); the fast path's agreement with the reference; attack
training on the device; and the outcome of reference and fast purification of one backdoored model.

Needs torch and torchvision only (no Ray, MLflow or Optuna), so it runs on a bare GPU machine:

    PYTHONPATH=. python benchmarks/sau_speed.py --out-dir OUT [--train-data cifar10 --data-root ~/data]
    PYTHONPATH=. python benchmarks/sau_speed.py --smoke --out-dir OUT    # the same code, tiny, on the CPU

It writes OUT/sau_speed.json (rewritten after each section, so a run cut short keeps what it measured):
- `speed.<arch>`: per path, the first round (setup, and the fast path's graph capture, included), the median
  of the later rounds, images/s, achieved TFLOP/s (the lean round's FLOPs, counted by torch's FlopCounterMode
  on one fast batch step, over the measured time), peak device memory, and a paper-config trial's time
  (first round + the later ones at the median; `trial_s_measured` for a trial timed whole, see --full-trial).
- `agreement.<arch>`: the fast path (bf16 autocast on CUDA, fp32 on the CPU) against the fp32 reference on
  one batch: the share of delta entries that agree, the loss terms' relative differences (on the reference's
  delta), and the parameter gradient's relative error and cosine.
- `attack_training` and `outcome`: a BadNets model trained with --recipe (timed), then purified by both
  paths with the paper's SAU settings: ACC/ASR/RA of each (skipped without --train-data, except in --smoke).
"""

import argparse
import copy
import dataclasses
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from backdoor import (TrainRecipe, build_model, clean_subset, eval_sets, evaluate, load_dataset, make_attack,
                      to_unit, train_backdoored)
from gpu_costs import median_step, random_data, synced_times
from sau_kernel import SAUConfig, purify, sau_loss, shared_pgd
from sau_kernel.fast import autocast, batch_step, frozen_pgd, masked_sau_loss
from sau_kernel.losses import clean_predictions, flip_masks, init_delta, js_divergence, sar_per_sample

PAPER_ROUNDS = 100
TORCHVISION = ("vgg19_bn", "efficientnet_b3", "mobilenet_v3_large", "densenet161")


@dataclasses.dataclass(frozen=True)
class Sizes:
    archs: tuple[str, ...]
    image: int  # side of the square images
    clean: int  # clean images SAU works on
    rounds: int  # rounds timed per path; the first is reported apart
    cfg: SAUConfig  # the SAU settings timed (rounds is set per run)
    recipe: TrainRecipe  # attack training (item 3's short recipe on the GPU)
    dataset: str | None  # attack training and outcome data, None to skip


FULL = Sizes(archs=("preactresnet18", *TORCHVISION), image=32, clean=2_500, rounds=4, cfg=SAUConfig(),
             recipe=TrainRecipe(epochs=30, lr=0.1, batch_size=256), dataset=None)
SMOKE = Sizes(archs=("cnn-small",), image=8, clean=24, rounds=2,  # 24 = a batch of 16 and a padded one of 8
              cfg=SAUConfig(pgd_steps=2, batch_size=16, rounds=2),
              recipe=TrainRecipe(epochs=1, lr=0.05, batch_size=64), dataset="digits")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def backdoorbench_batch(net, ref, optimizer, x, y, cfg: SAUConfig) -> float:
    """One batch with the passes as BackdoorBench's defense/sau.py writes them, in fp32: both models' clean
    predictions recomputed at every PGD step, and separate forwards of f on x and on x + delta."""
    net.eval()
    delta = init_delta(x, cfg).clamp(-cfg.eps, cfg.eps)
    for _ in range(cfg.pgd_steps):
        delta.requires_grad_(True)
        with torch.no_grad():
            c, c_g = net(x).argmax(1), ref(x).argmax(1)
        out, out_g = net(x + delta), ref(x + delta)
        flipped, flipped_g, shared = flip_masks(out, out_g, c, c_g)
        ce, ce_g = F.cross_entropy(out, y, reduction="none"), F.cross_entropy(out_g, y, reduction="none")
        loss_adv = -((ce * ~flipped).sum() + (ce_g * ~flipped_g).sum()) / (2 * len(x))
        loss_js = (js_divergence(out, out_g) * ~shared).sum() / len(x)
        (grad,) = torch.autograd.grad(cfg.beta_adv * loss_adv + cfg.beta_js * loss_js, delta)
        delta = (delta.detach() - cfg.pgd_step_size * grad.sign()).clamp(-cfg.eps, cfg.eps)
        if bool(shared.all()):
            break
    net.train(cfg.train_bn)
    logits, logits_adv = net(x), net(x + delta)
    with torch.no_grad():
        a_g, c_g = ref(x + delta).argmax(1), ref(x).argmax(1)
    loss_sar = (sar_per_sample(logits_adv, a_g) * ((a_g != y) & (a_g != c_g))).sum() / len(x)
    loss = (cfg.lmd_clean * F.cross_entropy(logits, y) + cfg.lmd_at * F.cross_entropy(logits_adv, y)
            + cfg.lmd_sar * loss_sar)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def backdoorbench_purify(model, x, y, cfg: SAUConfig, device: torch.device, on_round) -> None:
    ref = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    net = copy.deepcopy(model).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, amsgrad=True, weight_decay=0)
    x, y = x.to(device), y.to(device)
    for round_index in range(1, cfg.rounds + 1):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(round_index)).to(device)
        for batch in order.split(cfg.batch_size):
            backdoorbench_batch(net, ref, optimizer, x[batch], y[batch], cfg)
        on_round(round_index)


def lean_flops_per_image(model, x, y, cfg: SAUConfig, device: torch.device) -> float:
    """FLOPs of one fast batch step (what a lean round does per image), counted on a copy of the models."""
    net, ref = copy.deepcopy(model).to(device), copy.deepcopy(model).to(device).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, amsgrad=True)
    x, y = x[:8].to(device), y[:8].to(device)
    with FlopCounterMode(display=False) as counter:
        batch_step(net, ref, optimizer, x, y, torch.ones(len(x), dtype=torch.bool, device=device),
                   init_delta(x, cfg), cfg)
    return counter.get_total_flops() / len(x)


def time_path(path: str, model, x, y, cfg: SAUConfig, device: torch.device) -> dict:
    record, stamps = synced_times(str(device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    stamps[0] = time.perf_counter()
    if path == "backdoorbench":
        backdoorbench_purify(model, x, y, cfg, device, record)
    else:
        purify(model, x, y, dataclasses.replace(cfg, mode=path), device=device, on_round=record)
    first, later = stamps[1] - stamps[0], median_step(stamps)
    return {"first_round_s": first, "round_s": later, "images_per_s": len(x) / later,
            "trial_s": first + (PAPER_ROUNDS - 1) * later,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def speed(arch: str, sizes: Sizes, device: torch.device, full_trial: bool) -> dict:
    data = random_data(sizes.clean, sizes.image, 10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(arch, 10, 3, data.mean, data.std)
    x, y = to_unit(data.x_train), data.y_train
    cfg = dataclasses.replace(sizes.cfg, rounds=sizes.rounds)
    flops = lean_flops_per_image(model, x, y, cfg, device)
    result = {"clean_images": len(x), "lean_gflop_per_image_round": flops / 1e9}
    for path in ("backdoorbench", "reference", "fast"):
        figures = time_path(path, model, x, y, cfg, device)
        figures["achieved_tflops"] = flops * len(x) / figures["round_s"] / 1e12
        result[path] = figures
        print(f"{arch} {path}: {figures['round_s']:.4f} s/round (first {figures['first_round_s']:.3f} s)",
              flush=True)
    if full_trial:  # a paper-config trial timed whole, capture included
        trial_cfg = dataclasses.replace(sizes.cfg, rounds=PAPER_ROUNDS, mode="fast")
        sync(device)
        start = time.perf_counter()
        purify(model, x, y, trial_cfg, device=device)
        sync(device)
        result["fast"]["trial_s_measured"] = time.perf_counter() - start
    for path in ("reference", "backdoorbench"):
        result[f"speedup_vs_{path}"] = result[path]["trial_s"] / result["fast"]["trial_s"]
    return result


def agreement(arch: str, sizes: Sizes, device: torch.device) -> dict:
    """The fast path's batch computations against the fp32 reference's, on one batch of random images."""
    data = random_data(sizes.cfg.batch_size, sizes.image, 10, seed=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = build_model(arch, 10, 3, data.mean, data.std).to(device).eval()
    x, y, cfg = to_unit(data.x_train).to(device), data.y_train.to(device), sizes.cfg
    ref = copy.deepcopy(model).requires_grad_(False)
    fast_f, fast_g = copy.deepcopy(model), copy.deepcopy(ref)
    if device.type == "cuda":  # as FastRounds runs them
        fast_f.to(memory_format=torch.channels_last)
        fast_g.to(memory_format=torch.channels_last)
    delta = shared_pgd(model, ref, x, y, cfg)
    valid = torch.ones(len(x), dtype=torch.bool, device=device)
    with autocast(x):
        clean_pred = clean_predictions(fast_f, fast_g, x)
    fast_delta, _ = frozen_pgd(fast_f, fast_g, x, y, valid, init_delta(x, cfg), cfg, clean_pred)
    c_g = ref(x).argmax(1)
    loss, parts = sau_loss(model, ref, x, y, delta, cfg, ref_clean_pred=c_g)
    loss.backward()
    fast_loss, terms = masked_sau_loss(fast_f, fast_g, x, y, valid, delta, cfg, c_g)
    fast_loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    fast_grad = torch.cat([p.grad.flatten() for p in fast_f.parameters()])
    expected = [loss.item(), parts["clean"], parts["at"], parts["sar"]]
    return {"dtype": "bfloat16" if device.type == "cuda" else "float32",
            "delta_agreement": (fast_delta == delta).float().mean().item(),
            "loss_rel_diff": {name: abs(got - want) / max(abs(want), 1e-12)
                              for name, got, want in zip(("loss", "clean", "at", "sar"), terms.tolist(), expected)},
            "grad_rel_error": ((fast_grad - grad).norm() / grad.norm()).item(),
            "grad_cosine": F.cosine_similarity(fast_grad, grad, dim=0).item()}


def attack_and_outcome(sizes: Sizes, args, device: torch.device) -> dict:
    data = load_dataset(args.train_data or sizes.dataset, root=args.data_root)
    arch = "cnn-small" if args.smoke else "preactresnet18"
    attack = make_attack("badnets", {}, data.shape, data.num_classes)
    sync(device)
    start = time.perf_counter()
    model = train_backdoored(data, attack, arch, sizes.recipe, 0, device=device)
    sync(device)
    trained_s = time.perf_counter() - start
    sets = eval_sets(data, attack)
    before = evaluate(model, sets, device=device)
    result = {"attack_training": {"dataset": data.name, "arch": arch, "recipe": dataclasses.asdict(sizes.recipe),
                                  "seconds": trained_s, **dataclasses.asdict(before)},
              "outcome": {}}
    index = clean_subset(len(data.x_train), 0.05, 0)
    cfg = sizes.cfg if args.smoke else dataclasses.replace(sizes.cfg, rounds=PAPER_ROUNDS)
    for mode in ("reference", "fast"):
        start = time.perf_counter()
        purified = purify(model, to_unit(data.x_train[index]), data.y_train[index],
                          dataclasses.replace(cfg, mode=mode), device=device).model
        sync(device)
        result["outcome"][mode] = {"seconds": time.perf_counter() - start,
                                   **dataclasses.asdict(evaluate(purified, sets, device=device))}
    return result


def environment(device: torch.device) -> dict:
    found = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
             or platform.machine(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
             "command": " ".join(["python", *sys.argv]),
             "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}  # "fp32" convolutions on CUDA may run in TF32
    if device.type == "cuda":
        try:
            found["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            found["driver"] = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, help="directory for sau_speed.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (under a minute)")
    parser.add_argument("--only", action="append", choices=("speed", "agreement", "training"),
                        help="run just these sections (default: all)")
    parser.add_argument("--arch", action="append", help="architectures to time (default: all five)")
    parser.add_argument("--full-trial", action="store_true", help="also time a whole 100-round fast trial per arch")
    parser.add_argument("--train-data", help="data set for attack training and outcome (e.g. cifar10)")
    parser.add_argument("--data-root", help="its directory")
    parser.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE", help="TrainRecipe field")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    if args.recipe:
        given = {key: json.loads(value) for key, value in (pair.split("=", 1) for pair in args.recipe)}
        sizes = dataclasses.replace(sizes, recipe=TrainRecipe(**given))
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: threads only contend, worst on a shared machine
    torch.backends.cudnn.benchmark = True
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(device), "sizes": {"image": sizes.image, "clean": sizes.clean,
               "rounds_timed": sizes.rounds, "sau": dataclasses.asdict(sizes.cfg)}, "speed": {}, "agreement": {}}

    def save() -> None:
        (out / "sau_speed.json").write_text(json.dumps(results, indent=1) + "\n")

    sections = args.only or ["speed", "agreement", "training"]
    for arch in args.arch or sizes.archs:
        if "speed" in sections:
            results["speed"][arch] = speed(arch, sizes, device, args.full_trial)
            save()
        if "agreement" in sections:
            results["agreement"][arch] = agreement(arch, sizes, device)
            save()
    if "training" in sections and (args.train_data or sizes.dataset):
        results.update(attack_and_outcome(sizes, args, device))
        save()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
