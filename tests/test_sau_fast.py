"""The fast path (`mode: fast`) against the reference, on the CPU in float32, where it runs its own code (the
device-side PGD freeze, the padded last batch, the device-side loss sums) without autocast or CUDA graph. What
the graph capture relies on is checked here too: the batch step reads nothing back to the host, and the warm-up
steps before capture leave no trace.

Tolerances: PGD's delta is compared exactly (the fast step does the reference's arithmetic op for op, so
every sign step agrees). The losses differ from the reference's in how they average: a masked sum divided
by the count instead of `cross_entropy`'s own mean, and a batch padded with zero-weight samples sums more
(zero) terms, in another order; both move a float32 value by a few units in the last place, hence
rtol 1e-6 on losses and gradients (float32's epsilon is 1.2e-7). A whole purify accumulates such differences
through the Adam steps, hence 1e-6 on its parameters (measured: 0 to 4e-9) and 1e-6 relative on its losses.
"""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from test_sau_kernel import MeanThreshold, make_batch, make_cnn, perturbed_copy

from sau_kernel import SAUConfig, purify, sau_loss, shared_pgd
from sau_kernel.fast import WARMUP_STEPS, batch_step, frozen_pgd, masked_sau_loss, warm_up
from sau_kernel.losses import clean_predictions, init_delta

RTOL = 1e-6


def setup(seed, n=16):
    f = make_cnn(seed, dtype=torch.float32)
    g = perturbed_copy(f, seed + 500)
    x, y = make_batch(seed, n=n, dtype=torch.float32)
    return f, g, x, y


def fast_delta(f, g, x, y, cfg, valid=None):
    valid = torch.ones(len(x), dtype=torch.bool) if valid is None else valid
    return frozen_pgd(f, g, x, y, valid, init_delta(x, cfg), cfg, clean_predictions(f, g, x))


def padded(x, y, extra):
    """x and y with the first `extra` samples appended again, and the mask of the real ones."""
    valid = torch.arange(len(x) + extra) < len(x)
    return torch.cat([x, x[:extra]]), torch.cat([y, y[:extra]]), valid


PGD_CASES = [dict(eps=0.2, pgd_steps=5, pgd_step_size=0.2, pgd_init="max"),
             dict(eps=0.3, pgd_steps=3, pgd_step_size=0.1, pgd_init="min", beta_adv=0.5),
             dict(eps=0.5, pgd_steps=7, pgd_step_size=0.15, pgd_init="zero", beta_adv=1.0, beta_js=0.3)]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", PGD_CASES)
def test_frozen_pgd_equals_reference_exactly(seed, case):
    f, g, x, y = setup(seed)
    cfg = SAUConfig(**case)
    delta, _ = fast_delta(f, g, x, y, cfg)
    expected = shared_pgd(f, g, x, y, cfg)
    assert not torch.equal(expected, torch.full_like(x, expected.flatten()[0]))  # PGD moved delta
    assert torch.equal(delta, expected)


def test_frozen_pgd_freezes_where_the_reference_stops():
    # f = g, labels all 1, images' mean near 0.2: the first step lifts every mean over the 0.3 threshold, so
    # from step 2 on every sample is flipped to the same class, i.e. shared, and the reference breaks there,
    # three steps before the last.
    gen = torch.Generator().manual_seed(5)
    x = 0.2 + 0.02 * torch.rand(16, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.ones(16, dtype=torch.long)
    f, g = MeanThreshold(0.3), MeanThreshold(0.3)
    cfg = SAUConfig(eps=0.2, pgd_steps=5, pgd_step_size=0.15, pgd_init="zero")
    after_one, running_after_one = fast_delta(f, g, x, y, SAUConfig(**{**vars(cfg), "pgd_steps": 1}))
    assert bool(running_after_one)  # not all shared at step 1
    with torch.no_grad():
        assert (f(x + after_one).argmax(1) == 0).all()  # ...but from step 2 on
    delta, running = fast_delta(f, g, x, y, cfg)
    assert not bool(running)  # frozen
    assert torch.equal(delta, shared_pgd(f, g, x, y, cfg))
    assert torch.equal(delta, torch.full_like(x, 0.15))


@pytest.mark.parametrize("seed", [0, 2])
def test_padding_changes_neither_delta_nor_freeze(seed):
    f, g, x, y = setup(seed, n=10)
    cfg = SAUConfig(eps=0.3, pgd_steps=4, pgd_step_size=0.1)
    expected, expected_running = fast_delta(f, g, x, y, cfg)
    xp, yp, valid = padded(x, y, 6)
    delta, running = fast_delta(f, g, xp, yp, cfg, valid)
    assert torch.equal(delta[:10], expected)
    assert bool(running) == bool(expected_running)


def loss_and_grads(f, loss):
    f.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in f.named_parameters()}


def assert_close(got, expected):
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=RTOL, atol=RTOL * expected[name].abs().max()), name


@pytest.mark.parametrize("seed", [0, 1, 3])
@pytest.mark.parametrize("train_bn", [False, True])
def test_masked_loss_terms_and_gradients_match_reference(seed, train_bn):
    f, g, x, y = setup(seed)
    cfg = SAUConfig(eps=0.3, pgd_steps=5, pgd_step_size=0.1, lmd_clean=0.7, lmd_at=0.4, lmd_sar=1.8)
    delta = shared_pgd(f, g, x, y, cfg)
    c_g = g(x).argmax(1)
    f.train(train_bn)
    expected, parts = sau_loss(f, g, x, y, delta, cfg, ref_clean_pred=c_g)
    assert parts["sar"] > 0 and parts["at"] > 0  # every term is exercised
    expected_grads = loss_and_grads(f, expected)
    loss, terms = masked_sau_loss(f, g, x, y, torch.ones(16, dtype=torch.bool), delta, cfg, c_g)
    got = dict(zip(("loss", "clean", "at", "sar"), terms.tolist()))
    assert got == pytest.approx({"loss": expected.item(), **parts}, rel=RTOL)
    assert_close(loss_and_grads(f, loss), expected_grads)


@pytest.mark.parametrize("seed", [0, 1])
def test_padded_batch_gives_the_unpadded_loss_and_gradient(seed):
    f, g, x, y = setup(seed, n=10)
    cfg = SAUConfig(eps=0.3, pgd_steps=5, pgd_step_size=0.1, lmd_at=0.5)
    delta = shared_pgd(f, g, x, y, cfg)
    c_g = g(x).argmax(1)
    all_valid = torch.ones(10, dtype=torch.bool)
    loss, terms = masked_sau_loss(f, g, x, y, all_valid, delta, cfg, c_g)
    expected_grads = loss_and_grads(f, loss)
    xp, yp, valid = padded(x, y, 6)
    padded_loss, padded_terms = masked_sau_loss(f, g, xp, yp, valid, torch.cat([delta, delta[:6]]), cfg,
                                                torch.cat([c_g, c_g[:6]]))
    assert torch.allclose(padded_terms, terms, rtol=RTOL, atol=0)
    assert_close(loss_and_grads(f, padded_loss), expected_grads)


class HostReads(TorchDispatchMode):
    """Records the operators that bring a value back to the host (item, bool, a data-dependent shape): each is a
    synchronisation on CUDA and cannot be captured in a CUDA graph."""
    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("train_bn", [False, True])
def test_the_batch_step_reads_nothing_back_to_the_host(train_bn):
    f, g, x, y = setup(0, n=10)
    xp, yp, valid = padded(x, y, 6)
    cfg = SAUConfig(eps=0.3, pgd_steps=3, pgd_step_size=0.1, train_bn=train_bn)
    # SGD: the CPU's Adam reads its step count with item(); on CUDA the fast path's Adam is `capturable`.
    optimizer = torch.optim.SGD(f.parameters(), lr=0.01, momentum=0.9)
    with HostReads() as reads:
        terms = batch_step(f, g, optimizer, xp, yp, valid, init_delta(xp, cfg), cfg)
    assert reads.seen == []
    assert torch.isfinite(terms).all()
    with HostReads() as reads:  # the reference's early exit is such a read, so the check can see one
        shared_pgd(f.eval(), g, x, y, cfg)
    assert reads.seen == ["aten._local_scalar_dense.default"] * cfg.pgd_steps


def adam_twin(net, optimizer):
    """A copy of net and of its Adam optimizer, settings and state included."""
    twin = copy.deepcopy(net)
    twin_optimizer = torch.optim.Adam(twin.parameters())
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return twin, twin_optimizer


@pytest.mark.parametrize("with_state", [False, True])
def test_warm_up_before_capture_leaves_no_trace(with_state):
    # With train_bn the step also moves BN's running statistics, which the warm-up must put back too.
    f, g, x, y = setup(2)
    cfg = SAUConfig(eps=0.3, pgd_steps=3, pgd_step_size=0.1, train_bn=True)
    optimizer = torch.optim.Adam(f.parameters(), lr=1e-2, amsgrad=True)
    args = (x, y, torch.ones(len(x), dtype=torch.bool), init_delta(x, cfg))
    calls = []

    def step(*step_args):
        calls.append(1)
        return batch_step(f, g, optimizer, *step_args, cfg)

    if with_state:  # a resumed run's optimizer has state before the warm-up
        step(*args)
    twin, twin_optimizer = adam_twin(f, optimizer)
    before = copy.deepcopy(f.state_dict())
    warm_up(step, args, f, optimizer)
    assert len(calls) == WARMUP_STEPS + with_state
    for name, value in f.state_dict().items():
        assert torch.equal(value, before[name]), name
    # The next step from the warmed-up pair equals the next step from the untouched twin, Adam state included.
    got = step(*args)
    expected = batch_step(twin, g, twin_optimizer, *args, cfg)
    assert torch.equal(got, expected)
    for name, value in twin.state_dict().items():
        assert torch.equal(f.state_dict()[name], value), name
    state, twin_state = optimizer.state_dict()["state"], twin_optimizer.state_dict()["state"]
    assert state.keys() == twin_state.keys()
    for index, tensors in state.items():
        assert tensors.keys() == twin_state[index].keys()
        assert all(torch.equal(tensors[k], twin_state[index][k]) for k in tensors), index


PURIFY = dict(eps=0.2, pgd_steps=3, lr=1e-2, rounds=3, batch_size=16, seed=3)


def purify_data(seed=0, n=40):
    gen = torch.Generator().manual_seed(4000 + seed)
    return torch.rand(n, 3, 8, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen)


@pytest.mark.parametrize("pgd_init,train_bn", [("max", False), ("random", False), ("random", True)])
def test_fast_purify_matches_reference_purify(pgd_init, train_bn):
    # 40 images in batches of 16: the last batch (8) is padded, or with train_bn run at its own size.
    model = make_cnn(0, dtype=torch.float32)
    x, y = purify_data()
    cfg = SAUConfig(**PURIFY, pgd_init=pgd_init, train_bn=train_bn)
    expected = purify(model, x, y, cfg, device="cpu")
    got = purify(model, x, y, SAUConfig(**{**vars(cfg), "mode": "fast"}), device="cpu")
    reference_state = expected.model.state_dict()
    for name, value in got.model.state_dict().items():
        assert torch.allclose(value.float(), reference_state[name].float(), rtol=0, atol=1e-6), name
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in got.model.state_dict().items())
    for a, b in zip(got.history, expected.history):
        assert a.round == b.round
        assert (a.loss, a.clean, a.at, a.sar) == pytest.approx((b.loss, b.clean, b.at, b.sar), rel=RTOL)


def test_fast_purify_resumes_exactly_and_reports_every_round():
    model = make_cnn(1, dtype=torch.float32)
    x, y = purify_data(1)
    cfg = SAUConfig(**PURIFY, pgd_init="random", mode="fast")
    saved, seen = {}, []

    def on_round(progress):
        seen.append(progress.log.round)
        if progress.log.round == 1:
            saved["state"] = copy.deepcopy(progress.state_dict())

    full = purify(model, x, y, cfg, device="cpu", on_round=on_round)
    resumed = purify(model, x, y, cfg, device="cpu", resume=saved["state"])
    assert seen == [1, 2, 3]
    for name, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    assert [(h.loss, h.sar) for h in resumed.history] == [(h.loss, h.sar) for h in full.history]


def test_mode_is_validated():
    with pytest.raises(ValueError, match=r"^mode: must be one of reference, fast"):
        SAUConfig(mode="turbo")
    assert SAUConfig().mode == "reference"


def test_a_grid_reaches_fast_mode(write_grid):
    from orchestrator.spec import SpecError, expand, load_grid

    trials = expand(load_grid(write_grid(name="fast", sau={"mode": "fast"})))
    assert [t.config().mode for t in trials] == ["fast"]
    # A search keeps it on every sampled trial, and may search over it.
    search = {"num_samples": 2, "space": {"lmd_sar": {"low": 0.1, "high": 10.0}, "mode": {"choices": ["reference",
              "fast"]}}, "objectives": [{"metric": "asr_after", "mode": "min"}]}
    base = expand(load_grid(write_grid(name="fast-search", sau={"mode": "fast"}, search=search)))[0]
    assert base.with_params(lmd_sar=2.0).config().mode == "fast"
    assert base.with_params(mode="reference").config().mode == "reference"
    with pytest.raises(SpecError, match=r"sau\.mode: must be one of reference, fast"):
        load_grid(write_grid(name="bad-mode", sau={"mode": "turbo"}))
