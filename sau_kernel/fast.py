"""SAU's fast path: the function of `losses.py` and `purify.reference_round`, computed with static shapes and
no host synchronisation inside a round, so that on CUDA a whole batch step is captured once and replayed.

How it differs from the reference, and why the result is the same:
- Every batch has one size S. A smaller last batch is padded with images from the start of the round and a
  `valid` mask gives the padding zero weight in every sum, averages dividing by the real count, so padding
  changes no loss and no gradient. The passes that see it are per-sample (eval mode); with `train_bn` the
  unlearning pass's BN statistics would see it, so there the last batch runs at its own size instead.
- PGD's early exit (`shared.all()`, read on the host) becomes a device-side flag that freezes delta once
  every real sample is shared: the delta of the step that would have stopped is kept.
- Each batch's loss terms are added on the device, in float64 like the reference's Python floats, and read
  once per round.
- On CUDA only: the models' passes run in bf16 autocast with channels_last weights (the masked CE, JS and
  SAR terms in fp32), and the batch step (PGD, unlearning loss, backward, Adam) is a CUDA graph.
On the CPU the same code runs in fp32, op for op, without autocast or graph, which is what the tests check.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SAUConfig
from .losses import clean_predictions, flip_masks, init_delta, js_divergence, sar_per_sample

TERMS = ("loss", "clean", "at", "sar")
WARMUP_STEPS = 3  # PyTorch's CUDA-graph recipe: a few eager steps on a side stream before capture


def autocast(x: Tensor) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing elsewhere. The autocast cache is off, as CUDA graph capture requires."""
    if x.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)


def frozen_pgd(model: nn.Module, ref_model: nn.Module, x: Tensor, y: Tensor, valid: Tensor, delta: Tensor,
               cfg: SAUConfig, clean_pred: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """`losses.shared_pgd` from the initial `delta`, over the samples where `valid` is True.

    Returns delta and a device flag that is False once PGD has stopped (every valid sample was shared).
    """
    c, c_g = clean_pred
    count = valid.sum()
    delta = delta.clamp(-cfg.eps, cfg.eps)
    running = torch.ones((), dtype=torch.bool, device=x.device)
    for _ in range(cfg.pgd_steps):
        delta.requires_grad_(True)
        with autocast(x):
            out, out_g = model(x + delta), ref_model(x + delta)  # x + delta is deliberately not clipped
        out, out_g = out.float(), out_g.float()
        flipped, flipped_g, shared = flip_masks(out, out_g, c, c_g)
        ce, ce_g = F.cross_entropy(out, y, reduction="none"), F.cross_entropy(out_g, y, reduction="none")
        loss_adv = -((ce * (~flipped & valid)).sum() + (ce_g * (~flipped_g & valid)).sum()) / (2 * count)
        loss_js = (js_divergence(out, out_g) * (~shared & valid)).sum() / count
        (grad,) = torch.autograd.grad(cfg.beta_adv * loss_adv + cfg.beta_js * loss_js, delta)
        stepped = (delta.detach() - cfg.pgd_step_size * grad.sign()).clamp(-cfg.eps, cfg.eps)
        delta = torch.where(running, stepped, delta.detach())
        running = running & ~(shared | ~valid).all()
    return delta.detach(), running


def masked_sau_loss(model: nn.Module, ref_model: nn.Module, x: Tensor, y: Tensor, valid: Tensor, delta: Tensor,
                    cfg: SAUConfig, ref_clean_pred: Tensor) -> tuple[Tensor, Tensor]:
    """`losses.sau_loss` over the samples where `valid` is True; returns the loss and, detached on the
    device, the tensor of its terms in `TERMS` order."""
    batch, count = x.shape[0], valid.sum()
    x_adv = x + delta.detach()
    with autocast(x):
        logits, logits_adv = model(torch.cat([x, x_adv])).float().split(batch)  # one pass, as BN in train mode sees it
        with torch.no_grad():
            a_g = ref_model(x_adv).argmax(1)
    shared_mask = (a_g != y) & (a_g != ref_clean_pred) & valid
    loss_sar = (sar_per_sample(logits_adv, a_g) * shared_mask).sum() / count
    loss_clean = (F.cross_entropy(logits, y, reduction="none") * valid).sum() / count
    loss_at = (F.cross_entropy(logits_adv, y, reduction="none") * valid).sum() / count
    loss = cfg.lmd_clean * loss_clean + cfg.lmd_at * loss_at + cfg.lmd_sar * loss_sar
    return loss, torch.stack([loss, loss_clean, loss_at, loss_sar]).detach()


def batch_step(net: nn.Module, ref: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               valid: Tensor, delta: Tensor, cfg: SAUConfig) -> Tensor:
    """One batch of `purify.reference_round`: shared PGD in eval mode, the unlearning loss, one Adam step."""
    net.eval()
    with autocast(x):
        clean_pred = clean_predictions(net, ref, x)
    delta, _ = frozen_pgd(net, ref, x, y, valid, delta, cfg, clean_pred)
    net.train(cfg.train_bn)
    loss, terms = masked_sau_loss(net, ref, x, y, valid, delta, cfg, clean_pred[1])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return terms


def warm_up(step: Callable[..., Tensor], args: tuple[Tensor, ...], net: nn.Module,
            optimizer: torch.optim.Optimizer) -> None:
    """Run `step(*args)` WARMUP_STEPS times for real, as capture needs, then put back every tensor they changed:
    the net's parameters and buffers and the optimizer's state. State that did not exist before is zeroed, which
    is what a fresh Adam state is. So the run goes on as if the warm-up had not happened."""
    tensors = [*net.parameters(), *net.buffers()]
    saved = [t.detach().clone() for t in tensors]
    had_state = {p for p in optimizer.state if optimizer.state[p]}
    saved_state = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in had_state}
    for _ in range(WARMUP_STEPS):
        step(*args)
    with torch.no_grad():
        for tensor, value in zip(tensors, saved):
            tensor.copy_(value)
        for p, state in optimizer.state.items():
            for key, value in state.items():
                if p in had_state:
                    value.copy_(saved_state[p][key])
                else:
                    value.zero_()


class CapturedStep:
    """`step(*args)` captured once as a CUDA graph over static copies of `args`, then replayed (CUDA only)."""

    def __init__(self, step: Callable[..., Tensor], args: tuple[Tensor, ...], net: nn.Module,
                 optimizer: torch.optim.Optimizer):
        self.inputs = tuple(arg.clone() for arg in args)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            warm_up(step, self.inputs, net, optimizer)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = step(*self.inputs)

    def __call__(self, *args: Tensor) -> Tensor:
        for static, arg in zip(self.inputs, args):
            static.copy_(arg)
        self.graph.replay()
        return self.output


class FastRounds:
    """purify's rounds on the fast path: calling it with (order, generator) runs one round over the clean set in `order`
    and returns the sample-weighted sums of the loss terms, as `purify.reference_round` does."""

    def __init__(self, net: nn.Module, ref: nn.Module, optimizer: torch.optim.Optimizer, x_all: Tensor,
                 y_all: Tensor, cfg: SAUConfig):
        self.net, self.ref, self.optimizer, self.x_all, self.y_all, self.cfg = net, ref, optimizer, x_all, y_all, cfg
        self.device = x_all.device
        if self.device.type == "cuda":
            net.to(memory_format=torch.channels_last)
            ref.to(memory_format=torch.channels_last)
        n, size = len(x_all), min(cfg.batch_size, len(x_all))
        # Per batch: the positions in the round's order it takes (padded to `size` unless train_bn), the valid
        # mask and the real count. They are the same every round.
        self.batches = []
        for start in range(0, n, cfg.batch_size):
            count = min(cfg.batch_size, n - start)
            rows = torch.arange(start, start + count)
            if not cfg.train_bn:
                rows = torch.cat([rows, torch.arange(size - count)])
            valid = torch.arange(len(rows)) < count
            self.batches.append((rows.to(self.device), valid.to(self.device), count))
        # The initial delta of a batch: drawn per batch in the reference's order for random init, else fixed.
        self.fixed_init = {len(rows): init_delta(x_all[:len(rows)], cfg) for rows, _, _ in self.batches
                           if cfg.pgd_init != "random"}
        self.steps: dict[int, Callable[..., Tensor]] = {}

    def step(self, index: Tensor, valid: Tensor, delta: Tensor) -> Tensor:
        return batch_step(self.net, self.ref, self.optimizer, self.x_all[index], self.y_all[index], valid, delta,
                          self.cfg)

    def step_for(self, args: tuple[Tensor, ...]) -> Callable[..., Tensor]:
        """The step for this batch size: captured on CUDA (once per size), the plain step elsewhere."""
        size = len(args[0])
        if size not in self.steps:
            if self.device.type == "cuda":
                self.steps[size] = CapturedStep(self.step, args, self.net, self.optimizer)
            else:
                self.steps[size] = self.step
        return self.steps[size]

    def random_inits(self, generator: torch.Generator) -> Tensor:
        """Every batch's random initial delta, drawn in the reference's order, on the device in one copy."""
        shape, dtype = self.x_all.shape[1:], self.x_all.dtype
        draws = [init_delta(torch.empty(count, *shape, dtype=dtype), self.cfg, generator)
                 for _, _, count in self.batches]
        return torch.cat(draws).to(self.device)

    def __call__(self, order: Tensor, generator: torch.Generator) -> dict[str, float]:
        inits = self.random_inits(generator) if self.cfg.pgd_init == "random" else None
        sums = torch.zeros(len(TERMS), dtype=torch.float64, device=self.device)
        for rows, valid, count in self.batches:
            delta = inits[rows] if inits is not None else self.fixed_init[len(rows)]
            args = (order[rows], valid, delta)
            sums += self.step_for(args)(*args).double() * count
        return dict(zip(TERMS, sums.tolist()))
