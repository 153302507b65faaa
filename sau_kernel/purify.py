"""SAU purification: rounds of shared-adversarial PGD and unlearning over a small clean set."""
from __future__ import annotations

import copy
import functools
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .config import SAUConfig
from .fast import FastRounds
from .losses import clean_predictions, sau_loss, shared_pgd


@dataclass(frozen=True)
class RoundLog:
    round: int
    loss: float
    clean: float
    at: float
    sar: float
    seconds: float


@dataclass
class PurifyResult:
    model: nn.Module
    history: list[RoundLog]


@dataclass
class Progress:
    """What `on_round` sees after each round."""
    log: RoundLog
    model: nn.Module
    history: list[RoundLog]
    optimizer: torch.optim.Optimizer = field(repr=False)

    def state_dict(self) -> dict[str, Any]:
        """A snapshot, of tensors and plain values (loadable with weights_only=True), that
        `purify(resume=...)` continues from exactly."""
        return copy.deepcopy({"round": self.log.round, "model": self.model.state_dict(),
                              "optimizer": self.optimizer.state_dict(),
                              "history": [asdict(h) for h in self.history]})


def round_generator(cfg: SAUConfig, round_index: int) -> torch.Generator:
    # One generator per round, derived from the seed, so a resumed run draws exactly what an uninterrupted one does.
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + round_index)


def reference_round(net: nn.Module, ref: nn.Module, optimizer: torch.optim.Optimizer, x_all: Tensor, y_all: Tensor,
                    cfg: SAUConfig, order: Tensor, generator: torch.Generator) -> dict[str, float]:
    """One round over the clean set in `order`; returns the sample-weighted sums of the loss terms."""
    sums = {"loss": 0.0, "clean": 0.0, "at": 0.0, "sar": 0.0}
    for batch in order.split(cfg.batch_size):
        x, y = x_all[batch], y_all[batch]
        net.eval()
        clean_pred = clean_predictions(net, ref, x)
        delta = shared_pgd(net, ref, x, y, cfg, generator=generator, clean_pred=clean_pred)
        net.train(cfg.train_bn)
        loss, parts = sau_loss(net, ref, x, y, delta, cfg, ref_clean_pred=clean_pred[1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in {"loss": loss.item(), **parts}.items():
            sums[key] += value * len(batch)
    return sums


def purify(model: nn.Module, x_clean: Tensor, y_clean: Tensor, cfg: SAUConfig, *,
           device: torch.device | str | None = None,
           on_round: Callable[[Progress], None] | None = None,
           resume: dict[str, Any] | None = None) -> PurifyResult:
    """Purify a copy of `model` with SAU on (x_clean in [0, 1], y_clean); `model` itself is left untouched.

    `cfg.mode` picks the code that runs a round: the reference (`reference_round`) or the fast path
    (`fast.FastRounds`), which computes the same function.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ref = copy.deepcopy(model).to(device).eval().requires_grad_(False)  # g: the frozen backdoored copy
    net = copy.deepcopy(model).to(device)  # f: the model being purified
    capturable = cfg.mode == "fast" and device.type == "cuda"  # the fast path replays the Adam step in a CUDA graph
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, amsgrad=True, weight_decay=0, capturable=capturable)
    history: list[RoundLog] = []
    if resume is not None:
        net.load_state_dict(resume["model"])
        # A snapshot may come from the other mode or device: the optimizer keeps this run's `capturable`.
        saved = resume["optimizer"]
        optimizer.load_state_dict({**saved, "param_groups": [{**group, "capturable": capturable}
                                                             for group in saved["param_groups"]]})
        history = [RoundLog(**h) for h in resume["history"]]
    dtype = next(net.parameters()).dtype
    x_all, y_all = x_clean.to(device, dtype), y_clean.to(device)
    run_round = (FastRounds(net, ref, optimizer, x_all, y_all, cfg) if cfg.mode == "fast"
                 else functools.partial(reference_round, net, ref, optimizer, x_all, y_all, cfg))
    for round_index in range(len(history) + 1, cfg.rounds + 1):
        start = time.perf_counter()
        generator = round_generator(cfg, round_index)
        order = torch.randperm(len(x_all), generator=generator).to(device)
        sums = run_round(order, generator)
        net.eval()
        log = RoundLog(round=round_index, seconds=time.perf_counter() - start,
                       **{k: v / len(x_all) for k, v in sums.items()})
        history.append(log)
        if on_round is not None:
            on_round(Progress(log, net, history, optimizer))
    return PurifyResult(net.eval(), history)
