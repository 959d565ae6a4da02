"""The fused (torch.compile'd) step follows the same trajectory as the foreach and
single-tensor paths and the x/y/z reference: both modes, weight decay, warm-up, two
groups, params without gradients, an eval/train switch, NaN skips, bf16 params, rho=0
against schedulefree; plus the dispatch rules (auto threshold, per-optimizer fallback, no
re-run after a kernel wrote, no recompiles).

Compilation is the cost here: every test uses fp32 (or bf16) tensors of a few sizes,
so the kernels compile once per dtype combination and are reused (dynamic shapes,
hyperparameters in one float64 tensor, kernels/scalars.py). Inductor also caches them on disk.
"""
from __future__ import annotations

import warnings

import pytest
import schedulefree
import torch
from torch import nn

from sharded_msam_sf import AdamWMSAMScheduleFree, AdamWMSAMScheduleFreeReference
from sharded_msam_sf import kernels as K
from sharded_msam_sf.kernels import compiled as C

from .models import batch, decay_groups, flat, mse, one_step, tiny_mlp

pytestmark = pytest.mark.skipif(not K.compile_available("cpu"), reason="torch.compile unavailable on CPU")

HP = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, warmup_steps=10, r=0.5, weight_lr_power=2.0)
SIZES = (5, 16, 4)  # no tensor of one element (torch.compile would specialise it)


def run(make_opt, mode, steps=30, dtype=torch.float32, nan_at=None, model_seed=0):
    """A training run with two groups, the first bias without a gradient every third
    step and an eval → train switch; returns the eval-mode weights and the optimizer."""
    model = tiny_mlp(seed=model_seed, sizes=SIZES).to(dtype)
    x, y = batch(d_in=SIZES[0], d_out=SIZES[-1], dtype=dtype)
    opt = make_opt(decay_groups(model))
    opt.train()
    for i in range(steps):
        mse(model, x, y).backward()
        if mode == "two_pass":
            opt.move_to_ascent()
            mse(model, x, y).backward()
            opt.move_from_ascent()
        if i % 3 == 2:
            list(model.parameters())[1].grad = None
        if nan_at is not None and i == nan_at:
            list(model.parameters())[0].grad[0, 0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
        opt.zero_grad()
        if i == steps // 2:
            opt.eval()
            opt.train()
    opt.eval()
    return flat(model), opt


def calls():
    return K.compile_counters()["calls"]


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_fused_equals_foreach_single_and_reference(mode):
    before = calls()
    fused, _ = run(lambda g: AdamWMSAMScheduleFree(g, sam_mode=mode, fused=True, **HP), mode)
    assert calls() > before, "the fused kernels were not used"
    foreach, _ = run(lambda g: AdamWMSAMScheduleFree(g, sam_mode=mode, foreach=True, **HP), mode)
    single, _ = run(lambda g: AdamWMSAMScheduleFree(g, sam_mode=mode, foreach=False, **HP), mode)
    ref, _ = run(lambda g: AdamWMSAMScheduleFreeReference(g, sam_mode=mode, **HP), mode)
    moved = (foreach - flat(tiny_mlp(sizes=SIZES))).abs().max().item()
    assert moved > 1e-2
    assert (fused - foreach).abs().max().item() <= 2e-6
    assert (fused - single).abs().max().item() <= 2e-6
    assert (fused - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_fused_rho0_equals_schedulefree(mode):
    fused, _ = run(lambda g: AdamWMSAMScheduleFree(g, sam_mode=mode, rho=0.0, fused=True, **HP), mode)
    sf, _ = run(lambda g: schedulefree.AdamWScheduleFree(g, foreach=True, **HP), "one_pass")
    assert (fused - sf).abs().max().item() <= 2e-6


def test_fused_nan_step_is_skipped():
    """A NaN gradient at step 7 skips that step: same weights as the foreach path doing the same."""
    fused, opt = run(lambda g: AdamWMSAMScheduleFree(g, fused=True, **HP), "one_pass", nan_at=7)
    foreach, _ = run(lambda g: AdamWMSAMScheduleFree(g, foreach=True, **HP), "one_pass", nan_at=7)
    assert opt.skipped_steps == 1
    assert torch.isfinite(fused).all()
    assert (fused - foreach).abs().max().item() <= 2e-6


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_fused_bf16_params(mode):
    """bf16 params with fp32 state: the state agrees tightly, the params to a bf16 ulp."""
    fused, of = run(lambda g: AdamWMSAMScheduleFree(g, sam_mode=mode, fused=True, **HP), mode, dtype=torch.bfloat16)
    foreach, oe = run(lambda g: AdamWMSAMScheduleFree(g, sam_mode=mode, foreach=True, **HP), mode,
                      dtype=torch.bfloat16)
    zf = torch.cat([s["z"].reshape(-1) for s in of.state.values()])
    ze = torch.cat([s["z"].reshape(-1) for s in oe.state.values()])
    assert zf.dtype == torch.float32
    assert (zf - ze).abs().max().item() <= 1e-5
    diff = (fused.float() - foreach.float()).abs()
    assert (diff <= 2 ** -7 * foreach.float().abs().clamp_min(1e-3)).all(), diff.max()


def _auto_pair(state_dtype=None):
    torch.manual_seed(0)
    big = nn.Parameter(torch.randn(K.AUTO_MIN_NUMEL) * 0.1)
    small = nn.Parameter(torch.randn(7))
    big2, small2 = nn.Parameter(big.detach().clone()), nn.Parameter(small.detach().clone())
    auto = AdamWMSAMScheduleFree([big, small], state_dtype=state_dtype, **HP)
    ref = AdamWMSAMScheduleFree([big2, small2], foreach=True, state_dtype=state_dtype, **HP)
    return (big, small, auto), (big2, small2, ref)


def _run_pair(pair, steps=8):
    target = torch.randn(K.AUTO_MIN_NUMEL)
    for *_, opt in pair:
        opt.train()
    for _ in range(steps):
        for b, s, _ in pair:
            ((b - target) ** 2).sum().backward()
            (s ** 4).sum().backward()
        for *_, opt in pair:
            opt.step()
            opt.zero_grad()


def test_auto_default_on_cpu_takes_the_multi_tensor_kernel(monkeypatch):
    """fused=None, foreach=None, fp32 on the CPU: the group's tensors (together >= AUTO_MIN_NUMEL
    elements) go through one multi-tensor C++ call per pass, no compiled call; same trajectory as
    foreach."""
    if K.multi_tensor.load() is None:
        pytest.skip(f"no C++ toolchain for the multi-tensor kernel ({K.multi_tensor.build_error()})")
    seen = []
    for name in ("stats", "update_"):
        real = getattr(K.multi_tensor, name)
        monkeypatch.setattr(K.multi_tensor, name, lambda *a, _r=real, _n=name: (seen.append((_n, len(a[1]))), _r(*a))[1])
    pair = _auto_pair()
    before = calls()
    _run_pair(pair)
    assert calls() == before
    assert seen == [("stats", 2), ("update_", 2)] * 8   # both tensors, one call per pass
    (big, small, _), (big2, small2, _) = pair
    assert (big - big2).abs().max().item() <= 2e-6
    assert (small - small2).abs().max().item() <= 2e-6


def test_auto_default_compiles_large_tensors_only_without_multi_tensor(monkeypatch):
    """With the multi-tensor kernel off (SHARDED_MSAM_SF_MULTI_TENSOR=0; CUDA and bf16 state are the
    same case) tensors of >= AUTO_MIN_NUMEL elements go through the compiled kernels, small ones
    through foreach; same trajectory as foreach."""
    monkeypatch.setattr(K, "MULTI_TENSOR", False)
    pair = _auto_pair()
    before = calls()
    _run_pair(pair)
    assert calls() - before == 8 * 2  # one stats and one update call per step, for the big tensor only
    (big, small, _), (big2, small2, _) = pair
    assert (big - big2).abs().max().item() <= 2e-6
    assert (small - small2).abs().max().item() <= 2e-6


def test_no_recompiles_over_steps():
    """Changing lr, c_t, bc2, the scales and the tensor sizes does not recompile."""
    from torch._dynamo.utils import counters
    run(lambda g: AdamWMSAMScheduleFree(g, fused=True, **HP), "one_pass", steps=4)
    graphs = counters["stats"]["unique_graphs"]
    run(lambda g: AdamWMSAMScheduleFree(g, fused=True, **{**HP, "lr": 0.003}), "one_pass", steps=12)
    mlp = tiny_mlp(sizes=(9, 13, 6))
    opt = AdamWMSAMScheduleFree(mlp.parameters(), fused=True, weight_decay=0.05)
    opt.train()
    x, y = batch(d_in=9, d_out=6)
    for _ in range(3):
        one_step(mlp, opt, x, y)
    assert counters["stats"]["unique_graphs"] == graphs


def _broken_kernel(name):
    """A kernel whose compilation fails (the exception class Inductor raises)."""
    def fn(*a, **k):
        raise torch._inductor.exc.InductorError(RuntimeError("no compiler here"), None)
    return fn


def _train3(opt_kwargs, x=None, y=None):
    model = tiny_mlp(sizes=SIZES)
    opt = AdamWMSAMScheduleFree(decay_groups(model), **opt_kwargs, **HP)
    opt.train()
    x, y = batch(d_in=SIZES[0], d_out=SIZES[-1])
    for _ in range(3):
        one_step(model, opt, x, y)
    return model, opt


def test_compile_failure_falls_back_once(monkeypatch):
    """auto: a failing compiler gives one warning and the foreach trajectory; fused=True raises."""
    monkeypatch.setattr(K, "MULTI_TENSOR", False)   # the compiled path's policy
    monkeypatch.setattr(C, "_kernel", _broken_kernel)
    monkeypatch.setattr(K, "AUTO_MIN_NUMEL", 1)
    with pytest.raises(RuntimeError, match="fused=True"):
        run(lambda g: AdamWMSAMScheduleFree(g, fused=True, **HP), "one_pass", steps=2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model, opt = _train3({})
    fallback = [w for w in rec if "fused step is unavailable" in str(w.message)]
    assert len(fallback) == 1
    assert "cpu" in opt._fused_state.failed
    model2, _ = _train3({"foreach": True})
    assert torch.equal(flat(model), flat(model2))


def test_compile_failure_disables_only_that_optimizer(monkeypatch):
    """The failure is recorded in the optimizer that hit it: another one still compiles."""
    monkeypatch.setattr(K, "MULTI_TENSOR", False)   # the compiled path's policy
    monkeypatch.setattr(K, "AUTO_MIN_NUMEL", 1)
    with monkeypatch.context() as m:
        m.setattr(C, "_kernel", _broken_kernel)
        with pytest.warns(RuntimeWarning, match="fused step is unavailable"):
            _, failed = _train3({})
    before = calls()
    _, healthy = _train3({})
    assert calls() > before, "the second optimizer did not use the fused kernels"
    assert not healthy._fused_state.failed and "cpu" in failed._fused_state.failed
    before = calls()
    model = tiny_mlp(sizes=SIZES)
    opt = AdamWMSAMScheduleFree(decay_groups(model), **HP)
    opt._fused_state = failed._fused_state   # the failed optimizer's record: it stays on foreach
    opt.train()
    one_step(model, opt, *batch(d_in=SIZES[0], d_out=SIZES[-1]))
    assert calls() == before


def test_update_kernel_error_while_running_is_not_rerun(monkeypatch):
    """An error that is not a compile failure, from a kernel that writes its tensors, is
    raised with a message saying so: the step is never re-run eagerly on half-written state."""
    def writes_then_fails(name):
        real = C._RAW[name]

        def fn(*args):
            if name in C.WRITES:
                args[0].add_(1.0)   # p is written
                raise ValueError("device lost")
            return real(*args)
        return fn
    monkeypatch.setattr(C, "_kernel", writes_then_fails)
    monkeypatch.setattr(K, "AUTO_MIN_NUMEL", 1)
    monkeypatch.setattr(K, "MULTI_TENSOR", False)   # the compiled path's policy
    model = tiny_mlp(sizes=SIZES)
    opt = AdamWMSAMScheduleFree(decay_groups(model), **HP)
    opt.train()
    x, y = batch(d_in=SIZES[0], d_out=SIZES[-1])
    mse(model, x, y).backward()
    with pytest.raises(RuntimeError, match="may be partly written, so the step is not re-run") as err:
        opt.step()
    assert isinstance(err.value.__cause__, ValueError)
    assert opt.param_groups[0]["k"] == 0


def test_fused_and_foreach_together_is_an_error():
    with pytest.raises(ValueError, match="fused=True and foreach=True"):
        AdamWMSAMScheduleFree([nn.Parameter(torch.zeros(3))], fused=True, foreach=True)


def test_noncontiguous_param_goes_eager():
    """A non-contiguous param is updated by the eager path inside a fused step."""
    w = nn.Parameter(torch.randn(6, 4).t())   # 4x6, not contiguous
    w2 = nn.Parameter(w.detach().clone())      # contiguous copy
    assert not w.is_contiguous()
    a = AdamWMSAMScheduleFree([w], fused=True, **HP)
    b = AdamWMSAMScheduleFree([w2], foreach=True, **HP)
    a.train(), b.train()
    for _ in range(5):
        for p in (w, w2):
            (p.sin() ** 2).sum().backward()
        a.step(), b.step(), a.zero_grad(), b.zero_grad()
    assert (w - w2).abs().max().item() <= 2e-6


def test_missing_toolchain(monkeypatch):
    """No C++ compiler (simulated): fused=True says so, the default warns once and uses foreach."""
    monkeypatch.setattr(C, "_reasons", {"cpu": "no C++ compiler (simulated)"})
    monkeypatch.setattr(C, "_counters", {"calls": 0, "triton_calls": 0})
    monkeypatch.setattr(K, "AUTO_MIN_NUMEL", 1)
    assert not K.compile_available("cpu")
    with pytest.raises(RuntimeError, match="no C.. compiler"):
        run(lambda g: AdamWMSAMScheduleFree(g, fused=True, **HP), "one_pass", steps=1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _train3({})
    assert len([w for w in rec if "no C++ compiler (simulated)" in str(w.message)]) == 1
    assert K.compile_counters()["calls"] == 0
