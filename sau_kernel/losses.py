"""Shared-adversarial PGD and the SAU unlearning loss, as the reference code computes them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SAUConfig


def clean_predictions(model: nn.Module, ref_model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """argmax f(x) and argmax g(x): fixed for the whole PGD run, so computed once per batch."""
    with torch.no_grad():
        return model(x).argmax(1), ref_model(x).argmax(1)


def js_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Per-sample Jensen-Shannon divergence of two softmax outputs, probabilities clamped at 1e-8."""
    p = F.softmax(logits_p, dim=1).clamp(min=1e-8)
    q = F.softmax(logits_q, dim=1).clamp(min=1e-8)
    m = (p + q) / 2
    return 0.5 * (p * (p.log() - m.log())).sum(1) + 0.5 * (q * (q.log() - m.log())).sum(1)


def flip_masks(out: Tensor, out_g: Tensor, c: Tensor, c_g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """flipped_f, flipped_g and shared, per sample, from the two models' logits and their clean predictions."""
    a, a_g = out.argmax(1), out_g.argmax(1)
    flipped, flipped_g = a != c, a_g != c_g
    return flipped, flipped_g, flipped & flipped_g & (a == a_g)


def sar_per_sample(logits_adv: Tensor, a_g: Tensor) -> Tensor:
    """-log(1 - q) per sample, q = softmax(f(x_adv))[a_g], with the reference's clamps."""
    q = F.softmax(logits_adv, dim=1).gather(1, a_g[:, None]).squeeze(1)
    # Both halves are -log(1 - q); the clamps stop the gradient where q < 0.001, as in the reference.
    return 0.5 * (-torch.log(1e-6 + torch.clamp(1 - q, max=0.999))
                  - torch.log(1 + 1e-6 - torch.clamp(q, min=0.001)))


def init_delta(x: Tensor, cfg: SAUConfig, generator: torch.Generator | None = None) -> Tensor:
    if cfg.pgd_init == "max":
        return torch.full_like(x, cfg.eps)
    if cfg.pgd_init == "min":
        return torch.full_like(x, -cfg.eps)
    if cfg.pgd_init == "zero":
        return torch.zeros_like(x)
    # Drawn on the CPU so that a seeded generator gives the same delta on every device.
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype)
    return (noise.to(x.device) * 2 - 1) * cfg.eps


def shared_pgd(model: nn.Module, ref_model: nn.Module, x: Tensor, y: Tensor, cfg: SAUConfig, *,
               generator: torch.Generator | None = None,
               clean_pred: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The perturbation delta (detached, x's shape) that SAU unlearns from; x in [0, 1].

    Both models are used as they are (SAU keeps them in eval mode). Gradients are taken with
    respect to delta only, so no parameter of either model accumulates a gradient.
    """
    c, c_g = clean_pred if clean_pred is not None else clean_predictions(model, ref_model, x)
    batch = x.shape[0]
    delta = init_delta(x, cfg, generator).clamp(-cfg.eps, cfg.eps)
    for _ in range(cfg.pgd_steps):
        delta.requires_grad_(True)
        out, out_g = model(x + delta), ref_model(x + delta)  # x + delta is deliberately not clipped
        flipped, flipped_g, shared = flip_masks(out, out_g, c, c_g)
        ce, ce_g = F.cross_entropy(out, y, reduction="none"), F.cross_entropy(out_g, y, reduction="none")
        loss_adv = -((ce * ~flipped).sum() + (ce_g * ~flipped_g).sum()) / (2 * batch)
        loss_js = (js_divergence(out, out_g) * ~shared).sum() / batch
        (grad,) = torch.autograd.grad(cfg.beta_adv * loss_adv + cfg.beta_js * loss_js, delta)
        delta = (delta.detach() - cfg.pgd_step_size * grad.sign()).clamp(-cfg.eps, cfg.eps)
        if bool(shared.all()):
            break
    return delta.detach()


def sau_loss(model: nn.Module, ref_model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, cfg: SAUConfig, *,
             ref_clean_pred: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The unlearning loss of one batch, differentiable in `model`'s parameters only.

    Returns the loss and the float values of its terms (`clean`, `at`, `sar`).
    """
    batch = x.shape[0]
    x_adv = x + delta.detach()
    logits, logits_adv = model(torch.cat([x, x_adv])).split(batch)  # one pass, as BN in train mode sees it
    with torch.no_grad():
        a_g = ref_model(x_adv).argmax(1)
        c_g = ref_model(x).argmax(1) if ref_clean_pred is None else ref_clean_pred
    shared_mask = (a_g != y) & (a_g != c_g)
    loss_sar = (sar_per_sample(logits_adv, a_g) * shared_mask).sum() / batch
    loss_clean = F.cross_entropy(logits, y)
    loss_at = F.cross_entropy(logits_adv, y)
    loss = cfg.lmd_clean * loss_clean + cfg.lmd_at * loss_at + cfg.lmd_sar * loss_sar
    return loss, {"clean": loss_clean.item(), "at": loss_at.item(), "sar": loss_sar.item()}
