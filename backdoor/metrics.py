"""ACC / ASR / RA on the clean and triggered test sets, and the defense effectiveness rating (DER)."""

from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from .attacks import Attack
from .data import ImageData, to_unit


@dataclass(frozen=True)
class Metrics:
    acc: float  # accuracy on the clean test set
    asr: float  # share of triggered images classified as their backdoor label
    ra: float  # share of triggered images classified as their true label


@dataclass(frozen=True)
class EvalSets:
    x_clean: torch.Tensor  # uint8 images
    y_clean: torch.Tensor
    x_bd: torch.Tensor  # triggered uint8 images
    y_bd: torch.Tensor  # their backdoor labels
    y_true: torch.Tensor  # their true labels


def eval_sets(data: ImageData, attack: Attack) -> EvalSets:
    """The clean test set and the attack's triggered test set (see Attack.test_set)."""
    return EvalSets(data.x_test, data.y_test, *attack.test_set(data.x_test, data.y_test))


def _predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    batches = [model(to_unit(x[i:i + batch_size].to(device))).argmax(1).cpu()
               for i in range(0, len(x), batch_size)]
    return torch.cat(batches) if batches else torch.empty(0, dtype=torch.int64)


def evaluate(model: nn.Module, sets: EvalSets, *, device=None, batch_size: int = 512) -> Metrics:
    """Metrics in eval mode; `device` defaults to where the model lives. The model's mode is restored."""
    if device is None:
        first = next(chain(model.parameters(), model.buffers()), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            clean = _predict(model, sets.x_clean, device, batch_size)
            triggered = _predict(model, sets.x_bd, device, batch_size)
    finally:
        model.train(was_training)
    return Metrics(acc=(clean == sets.y_clean).float().mean().item(),
                   asr=(triggered == sets.y_bd).float().mean().item(),
                   ra=(triggered == sets.y_true).float().mean().item())


def der(before: Metrics, after: Metrics) -> float:
    """[max(0, ΔASR) − max(0, ΔACC) + 1] / 2 with drops measured from before to after; 0.5 = no change."""
    return (max(0.0, before.asr - after.asr) - max(0.0, before.acc - after.acc) + 1) / 2
