"""What one GPU spends on the paper's grids: a training epoch per architecture and image size, a round of SAU,
and InputAware's and SSBA's trigger training, measured on random images (their cost does not depend on content).

Needs torch and torchvision only (no Ray, MLflow or Optuna), so it runs on a bare GPU machine:

    PYTHONPATH=. python benchmarks/gpu_costs.py [--out costs.json]

Each figure is the median of the timed epochs or rounds after one warm-up, scaled to the full data set
(CIFAR-10/GTSRB-sized: 50,000 training images at 32×32; Tiny-ImageNet: 100,000 at 64×64).
"""

import argparse
import json
import statistics
import time

import torch

from backdoor import TrainRecipe, make_attack, train_backdoored
from backdoor.data import ImageData
from sau_kernel import SAUConfig, purify


def random_data(n: int, size: int, classes: int, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=g)
    return ImageData(name="random", x_train=x, y_train=y, x_test=x[:256], y_test=y[:256], num_classes=classes,
                     mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def synced_times(device: str = "cuda"):
    """A callback recording the wall time at each call (after the GPU finishes), and the list it fills."""
    stamps = [time.perf_counter()]

    def record(*_):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    return record, stamps


def median_step(stamps: list[float]) -> float:
    """Median time between calls, the first (warm-up) left out."""
    return statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))


def epoch_seconds(arch: str, size: int, classes: int, attack: str = "badnets", params: dict | None = None,
                  n: int = 4096, epochs: int = 3, device: str = "cuda") -> float:
    """Seconds per epoch of the project's training loop, for `n` images of size×size, batch 128."""
    data = random_data(n, size, classes)
    record, stamps = synced_times()
    train_backdoored(data, make_attack(attack, params or {}, data.shape, classes), arch,
                     TrainRecipe(epochs=epochs), 0, device=device, on_epoch=record)
    return median_step(stamps)


def sau_round_seconds(arch: str, size: int, classes: int, clean: int, rounds: int = 4, device: str = "cuda") -> float:
    data = random_data(clean, size, classes)
    model = train_backdoored(data, make_attack("badnets", {}, data.shape, classes), arch, TrainRecipe(epochs=1), 0,
                             device=device)
    record, stamps = synced_times()
    purify(model, data.x_train.float() / 255, data.y_train, SAUConfig(rounds=rounds), device=device,
           on_round=record)
    return median_step(stamps)


def learn_seconds(attack: str, epochs_param: str, n: int = 4096, epochs: int = 3, device: str = "cuda") -> float:
    """Seconds per epoch of an attack's trigger training, timed over `epochs` after a one-epoch warm-up call."""
    data = random_data(n, 32, 10)
    spent = []
    for count in (1, epochs):
        chosen = make_attack(attack, {epochs_param: count}, data.shape, 10)
        torch.cuda.synchronize()
        start = time.perf_counter()
        chosen.learn(data, 0, batch_size=128, device=torch.device(device))
        torch.cuda.synchronize()
        spent.append(time.perf_counter() - start)
    return spent[1] / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--only", action="append", help="measure just the figures whose name contains this")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    n, full, tiny = 4096, 50_000, 100_000
    figures = {
        **{f"epoch_s.{arch}.32": lambda arch=arch: epoch_seconds(arch, 32, 10) * full / n
           for arch in ("preactresnet18", "vgg19_bn", "efficientnet_b3", "mobilenet_v3_large", "densenet161")},
        "epoch_s.preactresnet18.64": lambda: epoch_seconds("preactresnet18", 64, 200) * tiny / n,
        **{f"epoch_s.preactresnet18.{size}.{attack}": lambda size=size, attack=attack, params=params: epoch_seconds(
            "preactresnet18", size, 10 if size == 32 else 200, attack, params) * (full if size == 32 else tiny) / n
           for size in (32, 64) for attack, params in (("inputaware", {"mask_epochs": 1}), ("wanet", {}))},
        "mask_epoch_s.inputaware.32": lambda: learn_seconds("inputaware", "mask_epochs") * full / n,
        "encoder_epoch_s.ssba.32": lambda: learn_seconds("ssba", "encoder_epochs") * full / n,
        # SAU at the paper's 5% of the training set, batch 256.
        "sau_round_s.preactresnet18.32.clean2500": lambda: sau_round_seconds("preactresnet18", 32, 10, 2_500),
        "sau_round_s.preactresnet18.64.clean5000": lambda: sau_round_seconds("preactresnet18", 64, 200, 5_000),
        **{f"sau_round_s.{arch}.32.clean2500": lambda arch=arch: sau_round_seconds(arch, 32, 10, 2_500)
           for arch in ("vgg19_bn", "efficientnet_b3", "mobilenet_v3_large", "densenet161")},
    }
    measured = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, measure in figures.items():
        if not args.only or any(part in name for part in args.only):
            measured[name] = measure()
            print(f"{name}: {measured[name]:.3f}", flush=True)
    text = json.dumps(measured, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
