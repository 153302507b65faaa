"""Training a backdoored model: poison once (or every batch, for a training-controlled attack), then SGD with
cosine annealing (BackdoorBench's recipe)."""

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import Attack
from .data import ImageData, to_unit
from .metrics import Metrics, eval_sets, evaluate
from .models import build_model
from .record import ModelRecord, save_record


class RecipeError(ValueError):
    """An invalid training recipe: "training.<field>: <reason>"."""


@dataclass(frozen=True)
class TrainRecipe:
    epochs: int = 100
    lr: float = 0.01
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            self._check(name, type(value) is int and value >= 1, "must be an integer >= 1")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            positive = name == "lr"
            ok = type(value) in (int, float) and (value > 0 if positive else value >= 0)
            self._check(name, ok, "must be a number > 0" if positive else "must be a number >= 0")
        self._check("augment", type(self.augment) is bool, "must be true or false")

    def _check(self, name: str, ok: bool, reason: str) -> None:
        if not ok:
            raise RecipeError(f"training.{name}: {reason}, got {getattr(self, name)!r}")


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """Random crop with zero padding (4 px, 1 px below 28 px) and, if `flip`, random horizontal flips."""
    n, _, height, width = x.shape
    pad = 4 if min(height, width) >= 28 else 1
    padded = F.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(x.device)
    left = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(x.device)
    rows = (top + torch.arange(height, device=x.device))[:, :, None]
    cols = (left + torch.arange(width, device=x.device))[:, None, :]
    # Advanced indexing around the channel slice puts the channel axis last: N×H×W×C.
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        flips = (torch.rand(n, generator=generator) < 0.5).to(x.device)[:, None, None, None]
        out = torch.where(flips, out.flip(3), out)
    return out


def _device(device) -> torch.device:
    """`device`, or CUDA where there is one."""
    return torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")


def train_clean(data: ImageData, arch: str, recipe: TrainRecipe, seed: int, *, device=None) -> nn.Module:
    """Train `arch` on the clean training set with the same recipe and seeding as a backdoored model."""
    device = _device(device)
    return _fit(data, data.x_train, data.y_train, arch, recipe, seed, device)


def train_backdoored(data: ImageData, attack: Attack, arch: str, recipe: TrainRecipe, seed: int, *,
                     device=None, on_epoch: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train `arch` on the poisoned training set; deterministic on CPU for a given seed. Returns eval mode.

    An attack whose trigger is computed from a clean model (`needs_model`) and has none yet gets one first:
    a clean model is trained for the attack's `clean_epochs` with this recipe and seed, and `attack.prepare`
    sets the trigger, which then travels with `attack` (into the model record, for instance). An attack whose
    trigger is a network (`learns_trigger`) and has none yet trains it first (`attack.learn`) on the clean
    training images, with this batch size and seed.

    An `in_batch` attack poisons each batch after its crop and flip (BackdoorBench's WaNet augments after
    poisoning instead), drawing its randomness from the same seeded generator as the shuffling and augmentation;
    its own loss term joins the classifier's and its own optimizers step with the classifier's.
    """
    device = _device(device)
    if attack.needs_model and not attack.state:
        clean_recipe = dataclasses.replace(recipe, epochs=attack.params.clean_epochs)
        attack.prepare(train_clean(data, arch, clean_recipe, seed, device=device), data, seed)
    if attack.learns_trigger and not attack.state:
        attack.learn(data, seed, batch_size=recipe.batch_size, device=device)
    x, y, _ = attack.poison_train(data.x_train, data.y_train, seed)
    return _fit(data, x, y, arch, recipe, seed, device, attack if attack.in_batch else None, on_epoch)


def _fit(data: ImageData, x: torch.Tensor, y: torch.Tensor, arch: str, recipe: TrainRecipe, seed: int,
         device: torch.device, in_batch: Attack | None = None,
         on_epoch: Callable[[int, float], None] | None = None) -> nn.Module:
    """The training loop: a seeded model, SGD with cosine annealing, optional per-batch poisoning."""
    x, y = x.to(device), y.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, data.num_classes, data.channels, data.mean, data.std).to(device)
    # On the GPU the classifier's passes run in bf16 autocast with channels_last weights, for speed; on the CPU
    # nothing changes, so a CPU-trained model stays bit-for-bit reproducible.
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
    optimizers = [optimizer, *(in_batch.optimizers() if in_batch is not None else [])]
    batch = min(recipe.batch_size, len(x))
    steps = len(x) // batch  # drop the last partial batch, as BackdoorBench does
    flip = data.channels == 3  # digits must not be mirrored
    model.train()
    for epoch in range(1, recipe.epochs + 1):
        order = torch.randperm(len(x), generator=generator).to(device)
        total = torch.zeros((), device=device)
        for step in range(steps):
            index = order[step * batch:(step + 1) * batch]
            images, labels = to_unit(augment(x[index], generator, flip) if recipe.augment else x[index]), y[index]
            loss = torch.zeros((), device=device)
            if in_batch is not None:
                images, labels, loss = in_batch.poison_batch(images, labels, generator)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(images)
            loss = loss + F.cross_entropy(logits.float(), labels)
            for each in optimizers:
                each.zero_grad(set_to_none=True)
            loss.backward()
            for each in optimizers:
                each.step()
            total += loss.detach()
        scheduler.step()
        if on_epoch is not None:
            on_epoch(epoch, float(total) / steps)
    return model.to(memory_format=torch.contiguous_format).eval()


def train_record(data: ImageData, attack: Attack, arch: str, recipe: TrainRecipe, seed: int, directory, *,
                 device=None, on_epoch: Callable[[int, float], None] | None = None) -> Metrics:
    """Train the backdoored model, evaluate it, and save both as a model record in `directory`."""
    device = _device(device)
    model = train_backdoored(data, attack, arch, recipe, seed, device=device, on_epoch=on_epoch)
    metrics = evaluate(model, eval_sets(data, attack), device=device)
    record = ModelRecord(arch=arch, num_classes=data.num_classes, shape=data.shape, mean=data.mean, std=data.std,
                         dataset=data.name, attack=attack.name, attack_params=dataclasses.asdict(attack.params),
                         seed=seed, recipe=dataclasses.asdict(recipe), metrics=dataclasses.asdict(metrics))
    save_record(directory, model.cpu(), attack, record)
    return metrics
