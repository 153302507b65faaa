"""sau_kernel against a plain, per-sample reference of docs/design.md section 4.

The reference functions below are written term by term from the specification, with Python loops
over samples, so that a vectorised or fused implementation is checked against the literal text.
Comparisons run in float64, so that no sign step is decided by rounding.
"""

import copy
import dataclasses
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sau_kernel import PurifyResult, RoundLog, SAUConfig, purify, sau_loss, shared_pgd

ATOL = 1e-5
RTOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Reference (docs/design.md section 4)
# ---------------------------------------------------------------------------------------------


def ref_js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence of two probability vectors.

    JS(p, q) = ½·Σ_c p̂_c·(log p̂_c − log m_c) + ½·Σ_c q̂_c·(log q̂_c − log m_c),
    with p̂ = max(p, 1e-8), q̂ = max(q, 1e-8), m = (p̂ + q̂)/2.
    The tests keep every probability above 1e-6, so where exactly the clamp sits does not matter.
    """
    p = p.clamp_min(1e-8)
    q = q.clamp_min(1e-8)
    m = (p + q) / 2
    return 0.5 * (p * (p.log() - m.log())).sum() + 0.5 * (q * (q.log() - m.log())).sum()


def ref_init(x: torch.Tensor, cfg: SAUConfig) -> torch.Tensor:
    value = {"max": cfg.eps, "min": -cfg.eps, "zero": 0.0}[cfg.pgd_init]
    return torch.full_like(x, value)


def ref_shared_pgd(f, g, x, y, cfg, trace=None):
    """Shared PGD, step 1 of docs/design.md section 4. `trace` (a list) receives per-step mask counts."""
    B = x.shape[0]
    eps = cfg.eps
    delta = ref_init(x, cfg).clamp(-eps, eps)
    with torch.no_grad():
        c = f(x).argmax(1)
        c_g = g(x).argmax(1)
    for _ in range(cfg.pgd_steps):
        d = delta.clone().requires_grad_(True)
        logits_f = f(x + d)
        logits_g = g(x + d)
        a = logits_f.argmax(1)
        a_g = logits_g.argmax(1)
        flipped_f = a != c
        flipped_g = a_g != c_g
        shared = flipped_f & flipped_g & (a == a_g)
        if trace is not None:
            trace.append(
                {
                    "flipped_f": int(flipped_f.sum()),
                    "flipped_g": int(flipped_g.sum()),
                    "shared": int(shared.sum()),
                    "disagree": int((flipped_f & flipped_g & (a != a_g)).sum()),
                }
            )
        # Start from a zero that depends on d, so an all-masked step still has a gradient (of zeros).
        ce_sum = 0.0 * d.sum()
        js_sum = 0.0 * d.sum()
        p_f = F.softmax(logits_f, dim=1)
        p_g = F.softmax(logits_g, dim=1)
        for i in range(B):
            if not flipped_f[i]:
                ce_sum = ce_sum + F.cross_entropy(logits_f[i : i + 1], y[i : i + 1])
            if not flipped_g[i]:
                ce_sum = ce_sum + F.cross_entropy(logits_g[i : i + 1], y[i : i + 1])
            if not shared[i]:
                js_sum = js_sum + ref_js(p_f[i], p_g[i])
        l_adv = -ce_sum / (2 * B)
        l_js = js_sum / B
        total = cfg.beta_adv * l_adv + cfg.beta_js * l_js
        (grad,) = torch.autograd.grad(total, d)
        delta = (delta - cfg.pgd_step_size * grad.sign()).clamp(-eps, eps)
        if bool(shared.all()):
            break
    return delta.detach()


def ref_sar_mask(g, x, y, delta):
    with torch.no_grad():
        a_g = g(x + delta).argmax(1)
        c_g = g(x).argmax(1)
    return (a_g != y) & (a_g != c_g), a_g


def ref_sau_loss(f, g, x, y, delta, cfg):
    """Unlearning loss, step 2 of docs/design.md section 4. Returns (loss, parts, q of the P samples)."""
    B = x.shape[0]
    x_adv = x + delta.detach()
    logits = f(torch.cat([x, x_adv]))  # one forward over [x; x̃] (matters for BN in train mode)
    logits_clean, logits_adv = logits[:B], logits[B:]
    P, a_g = ref_sar_mask(g, x, y, delta)
    clean = F.cross_entropy(logits_clean, y)
    at = F.cross_entropy(logits_adv, y)
    probs = F.softmax(logits_adv, dim=1)
    sar = 0.0 * logits_adv.sum()
    qs = []
    for i in range(B):
        if P[i]:
            q = probs[i, a_g[i]]
            qs.append(q.detach().item())
            first = -torch.log(1e-6 + torch.clamp(1 - q, max=0.999))
            second = -torch.log(1 + 1e-6 - torch.clamp(q, min=0.001))
            sar = sar + 0.5 * (first + second)
    sar = sar / B
    loss = cfg.lmd_clean * clean + cfg.lmd_at * at + cfg.lmd_sar * sar
    parts = {"clean": clean.item(), "at": at.item(), "sar": sar.item()}
    return loss, parts, qs


# ---------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------

NUM_CLASSES = 4


def make_cnn(seed, channels=3, num_classes=NUM_CLASSES, dtype=torch.float64, logit_scale=1.0):
    """Small CNN with BatchNorm in eval mode, random weights and random (non-trivial) BN stats."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )
    with torch.no_grad():
        for module in net:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
                module.bias.copy_(0.2 * torch.randn(n, generator=gen))
                module.running_mean.copy_(0.3 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
        net[-1].weight.mul_(logit_scale)
        net[-1].bias.mul_(logit_scale)
    return net.to(dtype).eval()


def perturbed_copy(model, seed, scale=0.2):
    """g: a copy of f with noise on every parameter, so predictions partly differ."""
    gen = torch.Generator().manual_seed(seed)
    g = copy.deepcopy(model)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return g.eval()


def make_batch(seed, n=16, channels=3, size=8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.rand(n, channels, size, size, generator=gen, dtype=dtype)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    return x, y


def models_and_batch(seed, dtype=torch.float64, **batch_kwargs):
    f = make_cnn(seed, channels=batch_kwargs.get("channels", 3), dtype=dtype)
    g = perturbed_copy(f, seed + 500)
    x, y = make_batch(seed, dtype=dtype, **batch_kwargs)
    return f, g, x, y


class MeanThreshold(nn.Module):
    """Clean class 1; class `flip_to` wins once the mean pixel value exceeds `threshold`."""

    def __init__(self, threshold, num_classes=2, flip_to=0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0, dtype=torch.float64))
        self.threshold = threshold
        self.num_classes = num_classes
        self.flip_to = flip_to

    def forward(self, x):
        z = self.scale * (x.flatten(1).mean(1) - self.threshold)
        columns = [torch.full_like(z, -1.0) for _ in range(self.num_classes)]
        columns[1] = torch.zeros_like(z)
        columns[self.flip_to] = z
        return torch.stack(columns, dim=1)


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# The reference's own scenarios must be non-trivial, or the comparisons below prove little
# ---------------------------------------------------------------------------------------------


def test_reference_scenarios_exercise_partial_masks():
    f, g, x, y = models_and_batch(0)
    trace = []
    ref_shared_pgd(f, g, x, y, SAUConfig(eps=0.3, pgd_steps=5, pgd_step_size=0.1), trace=trace)
    B = x.shape[0]
    assert any(0 < t["flipped_f"] < B for t in trace), trace
    assert any(0 < t["flipped_g"] < B for t in trace), trace
    assert any(0 < t["shared"] < B for t in trace), trace
    assert any(t["flipped_f"] != t["flipped_g"] for t in trace), trace
    delta = ref_shared_pgd(f, g, x, y, SAUConfig(eps=0.3, pgd_steps=5, pgd_step_size=0.1))
    P, _ = ref_sar_mask(g, x, y, delta)
    assert 0 < int(P.sum()) < B


# ---------------------------------------------------------------------------------------------
# shared_pgd
# ---------------------------------------------------------------------------------------------

PGD_CASES = [
    # eps, pgd_steps, pgd_step_size, pgd_init, beta_adv, beta_js
    (0.2, 5, 0.2, "max", 0.01, 1.0),
    (0.2, 5, 0.2, "min", 0.01, 1.0),
    (0.2, 5, 0.2, "zero", 0.01, 1.0),
    (0.3, 3, 0.1, "max", 0.5, 1.0),
    (0.1, 1, 0.05, "min", 0.01, 0.0),
    (0.5, 7, 0.15, "zero", 1.0, 0.3),
    (0.05, 4, 0.2, "max", 0.0, 1.0),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps,steps,step_size,init,beta_adv,beta_js", PGD_CASES)
def test_shared_pgd_matches_reference(seed, eps, steps, step_size, init, beta_adv, beta_js):
    f, g, x, y = models_and_batch(seed)
    cfg = SAUConfig(
        eps=eps, pgd_steps=steps, pgd_step_size=step_size, pgd_init=init, beta_adv=beta_adv, beta_js=beta_js
    )
    expected = ref_shared_pgd(f, g, x, y, cfg)
    delta = shared_pgd(f, g, x, y, cfg)
    assert delta.shape == x.shape
    assert delta.dtype == x.dtype
    mismatches = int((delta != expected).sum())
    assert mismatches == 0, f"{mismatches} of {delta.numel()} entries of delta differ from the reference"


@pytest.mark.parametrize("seed", [3, 4])
def test_shared_pgd_does_not_clip_to_unit_interval(seed):
    # Binary images: x + δ leaves [0, 1] on every pixel whose δ points outwards; clipping would
    # zero those gradient components and change the sign steps.
    f, g, x, y = models_and_batch(seed)
    x = (x > 0.5).to(x.dtype)
    cfg = SAUConfig(eps=0.3, pgd_steps=4, pgd_step_size=0.1, pgd_init="max")
    expected = ref_shared_pgd(f, g, x, y, cfg)
    assert ((x + expected) > 1).any()
    assert torch.equal(shared_pgd(f, g, x, y, cfg), expected)


def test_shared_pgd_all_shared_stops_with_delta_at_init():
    # f and g identical, and +ε lifts every image's mean over the threshold: every sample flips to
    # the same class at the first step, so every sample is shared. Both loss terms are then empty
    # sums, the update is a zero step, and PGD stops. (The early stop cannot be seen in δ itself,
    # since an all-shared step is a no-op; this checks the degenerate masks are handled.)
    gen = torch.Generator().manual_seed(7)
    x = 0.4 * torch.rand(16, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (16,), generator=gen)
    f = MeanThreshold(0.3)
    g = MeanThreshold(0.3)
    cfg = SAUConfig(eps=0.2, pgd_steps=5, pgd_step_size=0.05, pgd_init="max")
    trace = []
    expected = ref_shared_pgd(f, g, x, y, cfg, trace=trace)
    assert len(trace) == 1 and trace[0]["shared"] == 16
    delta = shared_pgd(f, g, x, y, cfg)
    assert torch.isfinite(delta).all()
    assert torch.equal(delta, expected)
    assert torch.equal(delta, torch.full_like(x, 0.2))


def test_shared_pgd_not_shared_when_only_one_model_flips():
    # Same construction, but g's threshold is out of reach: f flips, g does not, nothing is shared,
    # and the JS and g's adversarial CE drive δ.
    gen = torch.Generator().manual_seed(8)
    x = 0.4 * torch.rand(16, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (16,), generator=gen)
    f = MeanThreshold(0.3)
    g = MeanThreshold(0.6)
    cfg = SAUConfig(eps=0.2, pgd_steps=3, pgd_step_size=0.05, pgd_init="max")
    trace = []
    expected = ref_shared_pgd(f, g, x, y, cfg, trace=trace)
    assert len(trace) == 3 and all(t["shared"] == 0 for t in trace)
    assert not torch.equal(expected, torch.full_like(x, 0.2))
    assert torch.equal(shared_pgd(f, g, x, y, cfg), expected)


def test_shared_pgd_flipped_to_different_classes_is_not_shared():
    # Both models flip every sample, f to class 0 and g to class 2: flipped but not shared, so the
    # JS term still drives δ (a mask without a = a_g would call them shared and stop at once).
    gen = torch.Generator().manual_seed(9)
    x = 0.4 * torch.rand(16, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=gen)
    f = MeanThreshold(0.3, num_classes=3, flip_to=0)
    g = MeanThreshold(0.3, num_classes=3, flip_to=2)
    cfg = SAUConfig(eps=0.2, pgd_steps=2, pgd_step_size=0.05, pgd_init="max")
    trace = []
    expected = ref_shared_pgd(f, g, x, y, cfg, trace=trace)
    assert trace[0] == {"flipped_f": 16, "flipped_g": 16, "shared": 0, "disagree": 16}
    assert not torch.equal(expected, torch.full_like(x, 0.2))
    assert torch.equal(shared_pgd(f, g, x, y, cfg), expected)


@pytest.mark.parametrize("init", ["min", "max"])
def test_shared_pgd_matches_reference_with_unrelated_models(init):
    # g independent of f: samples where both flip but to different classes occur (seed 0, min).
    f, _, x, y = models_and_batch(0)
    g = make_cnn(100)
    cfg = SAUConfig(eps=0.2, pgd_steps=5, pgd_step_size=0.2, pgd_init=init)
    trace = []
    expected = ref_shared_pgd(f, g, x, y, cfg, trace=trace)
    if init == "min":
        assert any(t["disagree"] > 0 for t in trace), trace
    assert torch.equal(shared_pgd(f, g, x, y, cfg), expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_pgd_defaults_take_three_values(seed):
    f, g, x, y = models_and_batch(seed, dtype=torch.float32, size=12)
    cfg = SAUConfig()
    delta = shared_pgd(f, g, x, y, cfg)
    assert delta.shape == x.shape
    assert not delta.requires_grad
    allowed = torch.tensor([-cfg.eps, 0.0, cfg.eps], dtype=delta.dtype)
    assert torch.isin(delta, allowed).all(), torch.unique(delta)


def test_shared_pgd_random_init_bounded_and_seeded():
    f, g, x, y = models_and_batch(5)
    cfg = SAUConfig(eps=0.15, pgd_steps=3, pgd_step_size=0.04, pgd_init="random")
    d1 = shared_pgd(f, g, x, y, cfg, generator=torch.Generator().manual_seed(11))
    d2 = shared_pgd(f, g, x, y, cfg, generator=torch.Generator().manual_seed(11))
    d3 = shared_pgd(f, g, x, y, cfg, generator=torch.Generator().manual_seed(12))
    assert d1.shape == x.shape and not d1.requires_grad
    assert (d1.abs() <= cfg.eps).all()
    assert torch.equal(d1, d2)
    assert not torch.equal(d1, d3)
    # With step size below 2ε, a random start leaves values strictly inside (−ε, ε).
    assert ((d1.abs() < cfg.eps)).any()


def test_shared_pgd_leaves_model_gradients_alone():
    f, g, x, y = models_and_batch(6)
    cfg = SAUConfig(eps=0.2, pgd_steps=3)
    params = list(f.parameters()) + list(g.parameters())
    flags = [p.requires_grad for p in params]
    assert all(p.grad is None for p in params)
    shared_pgd(f, g, x, y, cfg)
    assert all(p.grad is None for p in params)
    assert [p.requires_grad for p in params] == flags

    gen = torch.Generator().manual_seed(9)
    known = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    for p, k in zip(params, known):
        p.grad = k.clone()
    shared_pgd(f, g, x, y, cfg)
    for p, k in zip(params, known):
        assert torch.equal(p.grad, k)


def test_shared_pgd_leaves_models_unchanged():
    f, g, x, y = models_and_batch(7)
    before_f, before_g = state_copy(f), state_copy(g)
    shared_pgd(f, g, x, y, SAUConfig(eps=0.2, pgd_steps=3))
    assert_state_equal(state_copy(f), before_f)
    assert_state_equal(state_copy(g), before_g)


# ---------------------------------------------------------------------------------------------
# sau_loss
# ---------------------------------------------------------------------------------------------


def assert_loss_matches(f, g, x, y, delta, cfg):
    f_ref = copy.deepcopy(f)
    expected, expected_parts, qs = ref_sau_loss(f_ref, g, x, y, delta, cfg)
    expected.backward()

    loss, parts = sau_loss(f, g, x, y, delta, cfg)
    assert loss.dim() == 0
    assert torch.allclose(loss.detach(), expected.detach(), atol=ATOL, rtol=RTOL), (float(loss), float(expected))
    assert {"clean", "at", "sar"} <= parts.keys()
    for name in ("clean", "at", "sar"):
        assert isinstance(parts[name], float), name
        assert parts[name] == pytest.approx(expected_parts[name], abs=ATOL, rel=RTOL), (name, parts, expected_parts)

    loss.backward()
    for (name, p), p_ref in zip(f.named_parameters(), f_ref.parameters()):
        assert p.grad is not None, name
        assert torch.allclose(p.grad, p_ref.grad, atol=ATOL, rtol=RTOL), (name, (p.grad - p_ref.grad).abs().max())
    for name, p in g.named_parameters():
        assert p.grad is None, f"g.{name} received a gradient"
    return qs


def random_lambdas(seed):
    gen = torch.Generator().manual_seed(2000 + seed)
    lmd_clean, lmd_at, lmd_sar = (0.1 + 2 * torch.rand(3, generator=gen, dtype=torch.float64)).tolist()
    return {"lmd_clean": lmd_clean, "lmd_at": lmd_at, "lmd_sar": lmd_sar}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sau_loss_matches_reference(seed):
    f, g, x, y = models_and_batch(seed)
    cfg = SAUConfig(eps=0.3, pgd_steps=5, pgd_step_size=0.1, **random_lambdas(seed))
    assert cfg.lmd_at > 0
    delta = ref_shared_pgd(f, g, x, y, cfg)
    P, _ = ref_sar_mask(g, x, y, delta)
    assert 0 < int(P.sum()) < x.shape[0]
    assert_loss_matches(f, g, x, y, delta, cfg)


@pytest.mark.parametrize("seed", [0, 1])
def test_sau_loss_default_weights(seed):
    f, g, x, y = models_and_batch(seed)
    cfg = SAUConfig()
    delta = ref_shared_pgd(f, g, x, y, cfg)
    assert_loss_matches(f, g, x, y, delta, cfg)


@pytest.mark.parametrize("seed", [0, 1])
def test_sau_loss_empty_mask(seed):
    # δ = 0 gives a_g = c_g on every sample, so P is empty and L_sar = 0.
    f, g, x, y = models_and_batch(seed)
    delta = torch.zeros_like(x)
    cfg = SAUConfig(**random_lambdas(seed))
    P, _ = ref_sar_mask(g, x, y, delta)
    assert not P.any()
    assert_loss_matches(f, g, x, y, delta, cfg)
    _, parts = sau_loss(f, g, x, y, delta, cfg)
    assert parts["sar"] == 0.0


def full_mask_batch(seed, logit_scale=1.0):
    """A batch where every sample is in P: keep samples whose g-prediction a large δ changes,
    then label each with a class other than its adversarial prediction."""
    f = make_cnn(seed, logit_scale=logit_scale)
    g = perturbed_copy(f, seed + 500)
    x, _ = make_batch(seed, n=96)
    gen = torch.Generator().manual_seed(3000 + seed)
    delta = 0.6 * torch.sign(torch.randn(x.shape, generator=gen, dtype=x.dtype))
    with torch.no_grad():
        a_g = g(x + delta).argmax(1)
        c_g = g(x).argmax(1)
    keep = a_g != c_g
    assert int(keep.sum()) >= 6
    x, delta, a_g = x[keep][:16], delta[keep][:16], a_g[keep][:16]
    y = (a_g + 1) % NUM_CLASSES
    return f, g, x, y, delta


@pytest.mark.parametrize("seed", [1, 4])
def test_sau_loss_full_mask(seed):
    f, g, x, y, delta = full_mask_batch(seed)
    cfg = SAUConfig(**random_lambdas(seed))
    P, _ = ref_sar_mask(g, x, y, delta)
    assert P.all()
    assert_loss_matches(f, g, x, y, delta, cfg)


def test_sau_loss_sar_clamps():
    # Peaky logits put some q below 0.001 (no gradient there) and others near 1.
    f, g, x, y, delta = full_mask_batch(4, logit_scale=25.0)
    cfg = SAUConfig(lmd_clean=0.5, lmd_at=0.25, lmd_sar=2.0)
    qs = assert_loss_matches(f, g, x, y, delta, cfg)
    assert min(qs) < 0.001 < max(qs), qs


def test_sau_loss_train_mode_uses_one_forward_over_both_halves():
    # With BN in train mode, "one forward of f over [x; x̃]" means batch statistics over 2B samples.
    f, g, x, y = models_and_batch(2)
    cfg = SAUConfig(train_bn=True, lmd_at=0.7)
    delta = ref_shared_pgd(f, g, x, y, cfg)
    f.train()
    assert_loss_matches(f, g, x, y, delta, cfg)


# ---------------------------------------------------------------------------------------------
# purify
# ---------------------------------------------------------------------------------------------

PURIFY_CFG = dict(eps=0.2, pgd_steps=2, lr=1e-2, rounds=4, batch_size=16, seed=3)


def purify_setup(seed=0):
    model = make_cnn(seed, channels=3, dtype=torch.float32)
    gen = torch.Generator().manual_seed(4000 + seed)
    x = torch.rand(40, 3, 8, 8, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (40,), generator=gen)
    return model, x, y


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def history_values(history):
    return [(h.round, h.loss, h.clean, h.at, h.sar) for h in history]


def test_purify_leaves_input_model_and_reports_each_round():
    model, x, y = purify_setup()
    before = state_copy(model)
    cfg = SAUConfig(**PURIFY_CFG)
    seen = []

    def on_round(progress):
        assert progress.model is not model
        assert isinstance(progress.log, RoundLog)
        assert len(progress.history) == progress.log.round
        assert progress.history[-1] == progress.log
        seen.append(progress.log.round)

    result = purify(model, x, y, cfg, on_round=on_round)
    assert isinstance(result, PurifyResult)
    assert_state_equal(state_copy(model), before)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert seen == [1, 2, 3, 4]
    assert [h.round for h in result.history] == [1, 2, 3, 4]
    for h in result.history:
        for name in ("loss", "clean", "at", "sar", "seconds"):
            value = getattr(h, name)
            assert isinstance(value, float) and value == value, (name, value)
    assert result.model is not model
    purified = result.model.state_dict()
    assert any(not torch.equal(purified[k], before[k]) for k in before if "weight" in k)


def test_purify_is_deterministic():
    model, x, y = purify_setup(1)
    cfg = SAUConfig(**PURIFY_CFG)
    a = purify(model, x, y, cfg)
    b = purify(model, x, y, cfg)
    assert_state_equal(state_copy(a.model), state_copy(b.model))
    assert history_values(a.history) == history_values(b.history)


@pytest.mark.parametrize("pgd_init,stop_at", [("max", 2), ("random", 1), ("random", 3)])
def test_purify_resume_equals_uninterrupted(pgd_init, stop_at):
    model, x, y = purify_setup(2)
    cfg = SAUConfig(**{**PURIFY_CFG, "pgd_init": pgd_init})
    saved = {}

    def on_round(progress):
        if progress.log.round == stop_at:
            saved["state"] = copy.deepcopy(progress.state_dict())

    full = purify(model, x, y, cfg, on_round=on_round)
    resumed_rounds = []
    resumed = purify(model, x, y, cfg, resume=saved["state"], on_round=lambda p: resumed_rounds.append(p.log.round))
    assert resumed_rounds == list(range(stop_at + 1, cfg.rounds + 1))
    assert_state_equal(state_copy(resumed.model), state_copy(full.model))
    assert history_values(resumed.history) == history_values(full.history)


def test_purify_resume_state_survives_weights_only_checkpoint():
    model, x, y = purify_setup(3)
    cfg = SAUConfig(**PURIFY_CFG)
    saved = {}

    def on_round(progress):
        if progress.log.round == 2:
            buffer = io.BytesIO()
            torch.save(progress.state_dict(), buffer)
            saved["bytes"] = buffer.getvalue()

    full = purify(model, x, y, cfg, on_round=on_round)
    state = torch.load(io.BytesIO(saved["bytes"]), weights_only=True)
    resumed = purify(model, x, y, cfg, resume=state)
    assert_state_equal(state_copy(resumed.model), state_copy(full.model))


def ref_purify_order_free(model, x, y, cfg):
    """purify on a clean set whose shuffling cannot matter (one batch, or one image repeated):
    per batch, shared PGD with both models in eval mode, then the unlearning loss with f in train
    mode iff train_bn, then one Adam step (amsgrad, no weight decay). Returns f and each round's
    sample-weighted mean loss."""
    f = copy.deepcopy(model)
    g = copy.deepcopy(model).eval()
    optimizer = torch.optim.Adam(f.parameters(), lr=cfg.lr, amsgrad=True, weight_decay=0)
    losses = []
    for _ in range(cfg.rounds):
        total = 0.0
        for xb, yb in zip(x.split(cfg.batch_size), y.split(cfg.batch_size)):
            f.eval()
            delta = ref_shared_pgd(f, g, xb, yb, cfg)
            f.train(cfg.train_bn)
            loss, _, _ = ref_sau_loss(f, g, xb, yb, delta, cfg)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(xb)
        losses.append(total / len(x))
    return f.eval(), losses


@pytest.mark.parametrize("layout", ["one_batch", "repeated_image"])
@pytest.mark.parametrize("train_bn", [False, True])
def test_purify_matches_reference_loop(train_bn, layout):
    model = make_cnn(5)
    x, y = make_batch(5, n=16)
    batch_size = 16
    if layout == "repeated_image":
        # Every batch holds the same content whatever the shuffle, so two batches per round
        # check that PGD runs in eval mode even after a train-mode unlearning step.
        x, y, batch_size = x[:1].repeat(16, 1, 1, 1), y[:1].repeat(16), 8
    cfg = SAUConfig(eps=0.3, pgd_steps=3, pgd_step_size=0.1, lr=1e-3, rounds=3, batch_size=batch_size,
                    lmd_at=0.5, train_bn=train_bn)
    expected, losses = ref_purify_order_free(model, x, y, cfg)
    result = purify(model, x, y, cfg, device="cpu")
    got = result.model.state_dict()
    for k, v in expected.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(got[k], v, atol=ATOL, rtol=RTOL), (k, (got[k] - v).abs().max())
        else:
            assert torch.equal(got[k], v), k
    assert [h.loss for h in result.history] == pytest.approx(losses, abs=ATOL, rel=RTOL)


def test_purify_bn_statistics_follow_train_bn():
    model, x, y = purify_setup(4)
    original = bn_buffers(model)
    assert any("running_mean" in k for k in original)
    frozen = purify(model, x, y, SAUConfig(**PURIFY_CFG, train_bn=False))
    frozen_buffers = bn_buffers(frozen.model)
    for k in original:
        if "running" in k:
            assert torch.equal(frozen_buffers[k], original[k]), k
    trained = purify(model, x, y, SAUConfig(**PURIFY_CFG, train_bn=True))
    trained_buffers = bn_buffers(trained.model)
    assert all(not torch.equal(trained_buffers[k], original[k]) for k in original if "running_mean" in k)
    assert_state_equal(bn_buffers(model), original)


# ---------------------------------------------------------------------------------------------
# SAUConfig
# ---------------------------------------------------------------------------------------------


def test_config_defaults_match_design_table():
    cfg = SAUConfig()
    assert (cfg.eps, cfg.pgd_steps, cfg.pgd_step_size, cfg.pgd_init) == (0.2, 5, 0.2, "max")
    assert (cfg.beta_adv, cfg.beta_js) == (0.01, 1.0)
    assert (cfg.lmd_clean, cfg.lmd_at, cfg.lmd_sar) == (1.0, 0.0, 1.0)
    assert (cfg.lr, cfg.rounds, cfg.batch_size, cfg.train_bn, cfg.seed) == (1e-4, 100, 256, False, 0)


def test_config_is_frozen():
    cfg = SAUConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.eps = 0.5


@pytest.mark.parametrize(
    "field,value",
    [
        ("eps", 0.0),
        ("eps", -0.1),
        ("pgd_steps", 0),
        ("pgd_steps", -3),
        ("pgd_init", "uniform"),
        ("pgd_init", ""),
        ("rounds", 0),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("beta_adv", -0.01),
        ("beta_js", -1.0),
        ("lmd_clean", -1.0),
        ("lmd_at", -0.5),
        ("lmd_sar", -1e-9),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError) as info:
        SAUConfig(**{field: value})
    message = str(info.value)
    assert field in message
    assert "\n" not in message.strip()


@pytest.mark.parametrize("init", ["max", "min", "zero", "random"])
def test_config_accepts_every_init(init):
    assert SAUConfig(pgd_init=init).pgd_init == init


def test_config_accepts_zero_weights():
    cfg = SAUConfig(beta_adv=0.0, beta_js=0.0, lmd_clean=0.0, lmd_at=0.0, lmd_sar=0.0)
    assert cfg.lmd_sar == 0.0
