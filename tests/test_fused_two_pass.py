"""two_pass's ``move_to_ascent()``/``move_from_ascent()`` on the compiled kernels: the fold
``m ← β_m·m + (1 − β_m)·g`` and the shift ``p ← p + s·m`` equal the eager ops (fp32, and bf16
m with the same stochastic-rounding bits), and a fused two_pass run calls them and follows
the x/y/z reference."""
from __future__ import annotations

import warnings

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree, AdamWMSAMScheduleFreeReference
from sharded_msam_sf import kernels as K
from sharded_msam_sf.kernels import bf16_state, compiled as C, eager

from .models import batch, decay_groups, flat, mse, tiny_mlp

pytestmark = pytest.mark.skipif(not K.compile_available("cpu"), reason="torch.compile unavailable on CPU")

HP = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, warmup_steps=10, r=0.5, weight_lr_power=2.0)
SIZES = (5, 16, 4)


def _kernel_calls(monkeypatch):
    seen = []
    real = C.call
    monkeypatch.setattr(C, "call", lambda state, impl, name, *a: (seen.append(name), real(state, impl, name, *a))[1])
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_kernel_equals_eager(dtype, monkeypatch):
    seen = _kernel_calls(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    ms = [torch.randn(n, generator=gen).to(dtype) for n in (37, 300)]
    gs = [torch.randn(n, generator=gen) for n in (37, 300)]
    fused = [m.clone() for m in ms]
    K.fold_momentum_(fused, gs, 0.9, impl="fused", step=3)
    assert seen.count("fold") == 2
    ref = [m.clone() for m in ms]
    K.fold_momentum_(ref, gs, 0.9, impl="foreach", step=3)
    assert seen.count("fold") == 2
    for a, b, m in zip(fused, ref, ms):
        assert a.dtype == dtype and not torch.equal(a, m)
        if dtype == torch.float32:
            assert (a - b).abs().max().item() <= 1e-6
        else:  # the same random bits: equal up to one bf16 ulp where fp32 rounding differs at a boundary
            ulp = 2.0 ** -7 * b.float().abs().clamp_min(1e-30)
            assert ((a.float() - b.float()).abs() <= ulp).all()
            assert (a == b).float().mean().item() > 0.99
    # stochastic rounding really uses the fold's bits: another step gives other roundings
    other = [m.clone() for m in ms]
    K.fold_momentum_(other, gs, 0.9, impl="fused", step=4)
    if dtype == torch.bfloat16:
        assert not all(torch.equal(a, b) for a, b in zip(other, fused))


@pytest.mark.parametrize("mdtype", [torch.float32, torch.bfloat16])
def test_shift_kernel_equals_eager(mdtype, monkeypatch):
    seen = _kernel_calls(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    ps = [torch.randn(n, generator=gen) for n in (37, 300)]
    ms = [torch.randn(n, generator=gen).to(mdtype) for n in (37, 300)]
    fused = [p.clone() for p in ps]
    K.add_scaled_(fused, ms, -0.25, impl="fused")
    assert seen.count("shift") == 2
    ref = [p.clone() for p in ps]
    eager.add_scaled_(ref, ms, -0.25, foreach=False)
    for a, b, p in zip(fused, ref, ps):
        assert not torch.equal(a, p)
        assert (a - b).abs().max().item() <= 1e-6
    # remove after apply restores p up to rounding
    K.add_scaled_(fused, ms, 0.25, impl="fused")
    assert max((a - p).abs().max().item() for a, p in zip(fused, ps)) <= 1e-6


def _run(make_opt, steps=20, state_dtype=None):
    model = tiny_mlp(seed=0, sizes=SIZES)
    x, y = batch(d_in=SIZES[0], d_out=SIZES[-1])
    opt = make_opt(decay_groups(model))
    opt.train()
    for i in range(steps):
        mse(model, x, y).backward()
        opt.move_to_ascent()
        mse(model, x, y).backward()
        opt.move_from_ascent()
        if i % 3 == 2:
            list(model.parameters())[1].grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
        opt.zero_grad()
        if i == steps // 2:
            opt.eval()
            opt.train()
    opt.eval()
    return flat(model)


def test_two_pass_fused_uses_the_kernels_and_follows_the_reference(monkeypatch):
    seen = _kernel_calls(monkeypatch)
    fused = _run(lambda g: AdamWMSAMScheduleFree(g, sam_mode="two_pass", fused=True, **HP))
    assert seen.count("fold") > 0 and seen.count("shift") > 0 and seen.count("update") > 0
    ref = _run(lambda g: AdamWMSAMScheduleFreeReference(g, sam_mode="two_pass", **HP))
    foreach = _run(lambda g: AdamWMSAMScheduleFree(g, sam_mode="two_pass", foreach=True, **HP))
    assert (foreach - flat(tiny_mlp(sizes=SIZES))).abs().max().item() > 1e-2
    assert (fused - foreach).abs().max().item() <= 2e-6
    assert (fused - ref).abs().max().item() <= 1e-5


def test_two_pass_bf16_state_fused_equals_foreach(monkeypatch):
    """bf16 m: the fused fold rounds with the eager fold's bits (bf16_state.SALT_FOLD)."""
    seen = _kernel_calls(monkeypatch)
    kw = dict(sam_mode="two_pass", state_dtype=torch.bfloat16, **HP)
    fused = _run(lambda g: AdamWMSAMScheduleFree(g, fused=True, **kw), steps=10)
    assert seen.count("fold") > 0
    foreach = _run(lambda g: AdamWMSAMScheduleFree(g, foreach=True, **kw), steps=10)
    assert (fused - foreach).abs().max().item() <= 1e-2
    assert bf16_state.SALT_FOLD != bf16_state.SALT_UPDATE
