"""`ft`: fine-tuning on the clean subset with SAU's budget, the baseline every backdoor-defense paper reports.

Same number of parameter updates as SAU (`rounds` passes over the clean subset in batches of `batch_size`),
same optimizer (Adam with amsgrad, no weight decay, at `lr`), same batch order (one generator per round from
the seed), BatchNorm statistics frozen unless `train_bn`: the only difference from SAU is its adversarial
term, so a gap between the two is SAU's doing. The defaults are SAUConfig's."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sau_kernel import Progress, PurifyResult, RoundLog
from sau_kernel.purify import round_generator

from .base import Defense


@dataclass(frozen=True)
class FTConfig:
    lr: float = 1e-4  # SAUConfig's
    rounds: int = 100  # SAUConfig's
    batch_size: int = 256  # SAUConfig's
    train_bn: bool = False  # SAUConfig's: BN statistics of 2,500 images would replace those of 50,000
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [("lr", self.lr > 0, "must be > 0"), ("rounds", self.rounds >= 1, "must be >= 1"),
                  ("batch_size", self.batch_size >= 1, "must be >= 1"), ("seed", self.seed >= 0, "must be >= 0")]
        for name, ok, reason in checks:
            if not ok:
                raise ValueError(f"{name}: {reason} (got {getattr(self, name)!r})")


def fine_tune(model, x_clean, y_clean, cfg: FTConfig, *, device, on_round=None, resume=None) -> PurifyResult:
    net = copy.deepcopy(model).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, amsgrad=True, weight_decay=0)
    history: list[RoundLog] = []
    if resume is not None:
        net.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        history = [RoundLog(**h) for h in resume["history"]]
    x_all, y_all = x_clean.to(device, next(net.parameters()).dtype), y_clean.to(device)
    for round_index in range(len(history) + 1, cfg.rounds + 1):
        start = time.perf_counter()
        order = torch.randperm(len(x_all), generator=round_generator(cfg, round_index)).to(device)
        net.train(cfg.train_bn)
        total = 0.0
        for batch in order.split(cfg.batch_size):
            loss = F.cross_entropy(net(x_all[batch]), y_all[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        net.eval()
        mean = total / len(x_all)
        log = RoundLog(round=round_index, loss=mean, clean=mean, at=0.0, sar=0.0,
                       seconds=time.perf_counter() - start)
        history.append(log)
        if on_round is not None:
            on_round(Progress(log, net, history, optimizer))
    return PurifyResult(net.eval(), history)


class FineTuning(Defense):
    name = "ft"
    params_type = FTConfig
    id_fields = frozenset({"lr", "rounds", "batch_size", "train_bn", "seed"})
    purify = staticmethod(fine_tune)
