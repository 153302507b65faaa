"""What `cnn-small` costs and learns: FLOPs per image, CPU seconds per epoch, and clean/BadNets accuracy on real
images (the MNIST and CIFAR-10 subsets in ../shared/data). Torch only; the figures land in one JSON file.

    python benchmarks/cnn_small.py --out benchmarks/results/cnn_small_cpu.json [--smoke]

MNIST: the first 4,000 training and 2,000 test images, 4 epochs, SGD lr 0.05, batch 64, no augmentation, seed 0;
clean and BadNets (its defaults). CIFAR-10: the whole subset (5,085 training images), 30 epochs, lr 0.05, batch 64,
no augmentation (the README's recipe), clean. Seconds per epoch are wall and process-CPU seconds of the MNIST
runs (4,000 images), with torch's default thread count. `--smoke` runs every step on a few hundred images for one
epoch (no data set needed: digits), to show the script works.
"""

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from backdoor import CODE_VERSION, TrainRecipe, build_model, eval_sets, evaluate, load_dataset, make_attack
from backdoor.train import train_backdoored

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SIZES = {"digits 8x8": (1, 8, 8), "mnist 28x28": (1, 28, 28), "cifar 32x32": (3, 32, 32), "tiny 64x64": (3, 64, 64)}


def flops_per_image(shape: tuple[int, int, int], num_classes: int = 10) -> int:
    """Multiply-adds x 2 of the convolutions and linear layers for one image (BN, ReLU and pooling left out)."""
    model = build_model("cnn-small", num_classes, shape[0], (0.5,) * shape[0], (0.5,) * shape[0]).eval()
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += 2 * output.numel() * per_output
        elif isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for hook in hooks:
        hook.remove()
    return total


def run(data, attack_name: str, params: dict, recipe: TrainRecipe) -> dict:
    """Train cnn-small with `recipe` under `attack` (poison_ratio 0: clean); its metrics and epoch times."""
    attack = make_attack(attack_name, params, data.shape, data.num_classes)
    epochs: list[tuple[float, float]] = []
    mark = [time.perf_counter(), time.process_time()]

    def on_epoch(epoch: int, loss: float) -> None:
        now = [time.perf_counter(), time.process_time()]
        epochs.append((now[0] - mark[0], now[1] - mark[1]))
        mark[:] = now

    model = train_backdoored(data, attack, "cnn-small", recipe, 0, device="cpu", on_epoch=on_epoch)
    metrics = evaluate(model, eval_sets(data, attack))
    return {**asdict(metrics), "epoch_wall_s": [round(w, 2) for w, _ in epochs],
            "epoch_cpu_s": [round(c, 2) for _, c in epochs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="a few hundred digits images, one epoch")
    args = parser.parse_args()

    result = {"code_version": CODE_VERSION, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "nproc": os.cpu_count(), "machine": platform.machine(), "load_avg_start": os.getloadavg(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "smoke": args.smoke,
              "flops_per_image": {name: flops_per_image(shape) for name, shape in SIZES.items()}}
    if args.smoke:
        digits = load_dataset("digits")
        small = replace(digits, x_train=digits.x_train[:256], y_train=digits.y_train[:256])
        recipe = TrainRecipe(epochs=1, lr=0.05, batch_size=64, augment=False)
        runs = {"mnist": (small, recipe), "cifar10": (small, recipe)}
    else:
        mnist = load_dataset(f"npz:{DATA / 'mnist_subset.npz'}")
        mnist = replace(mnist, x_train=mnist.x_train[:4000], y_train=mnist.y_train[:4000],
                        x_test=mnist.x_test[:2000], y_test=mnist.y_test[:2000])
        cifar = load_dataset(f"npz:{DATA / 'cifar10_subset.npz'}")
        runs = {"mnist": (mnist, TrainRecipe(epochs=4, lr=0.05, batch_size=64, augment=False)),
                "cifar10": (cifar, TrainRecipe(epochs=30, lr=0.05, batch_size=64, augment=False))}
    mnist_data, mnist_recipe = runs["mnist"]
    result["mnist_clean"] = run(mnist_data, "badnets", {"poison_ratio": 0.0}, mnist_recipe)
    result["mnist_badnets"] = run(mnist_data, "badnets", {}, mnist_recipe)
    cifar_data, cifar_recipe = runs["cifar10"]
    result["cifar10_clean"] = run(cifar_data, "badnets", {"poison_ratio": 0.0}, cifar_recipe)
    result["load_avg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)} | {
        "flops": result["flops_per_image"],
        **{k: {m: result[k][m] for m in ("acc", "asr", "ra")} for k in ("mnist_clean", "mnist_badnets", "cifar10_clean")}}))


if __name__ == "__main__":
    main()
