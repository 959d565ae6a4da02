"""The multi-tensor C++ kernel (kernels/multi_tensor.py) for many small fp32 CPU tensors: its
statistics and updates equal the foreach path's (one_pass with m, without m, the flags of a NaN,
an inf and an overflowing gradient), and an optimizer with many small tensors takes it by default
and follows the reference trajectory."""
from __future__ import annotations

import warnings

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree, AdamWMSAMScheduleFreeReference
from sharded_msam_sf import kernels as K
from sharded_msam_sf.kernels import eager, multi_tensor as MT

pytestmark = pytest.mark.skipif(not K.compile_available("cpu") or MT.load() is None,
                                reason=f"no C++ toolchain for the multi-tensor kernel ({MT.build_error()})")

HYPER = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, ckp1=0.3, bias_correction2=0.2,
             beta_m=0.9, remove_scale=0.02, apply_scale=-0.03)
SIZES = [1, 3, 17, 100, 40000]   # one spans several chunks (MT.CHUNK)


def _tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda scale: [torch.randn(n, generator=gen) * scale for n in SIZES]  # noqa: E731
    return mk(0.1), mk(1e-2), mk(0.1), [t.abs() for t in mk(1e-4)], mk(1e-2)


def _count(monkeypatch):
    seen = []
    for name in ("stats", "update_"):
        real = getattr(MT, name)
        monkeypatch.setattr(MT, name, lambda *a, _r=real, _n=name: (seen.append(_n), _r(*a))[1])
    return seen


@pytest.mark.parametrize("with_m", [True, False])
def test_update_equals_foreach(with_m, monkeypatch):
    monkeypatch.setattr(K, "MULTI_MIN_TENSORS", 2)
    seen = _count(monkeypatch)
    p, g, z, v, m = _tensors()
    hyper = dict(HYPER) if with_m else dict(HYPER, beta_m=None, remove_scale=0.0, apply_scale=0.0)
    a = [[t.clone() for t in ts] for ts in (p, z, v, m)]
    b = [[t.clone() for t in ts] for ts in (p, z, v, m)]
    K.sf_adamw_update_(a[0], g, a[1], a[2], a[3] if with_m else None, impl="auto", **hyper)
    assert seen == ["update_"]
    eager.sf_adamw_update_(b[0], g, b[1], b[2], b[3] if with_m else None, foreach=True, **hyper)
    for xs, ys, orig in zip(a, b, (p, z, v, m)):
        for x, y, o in zip(xs, ys, orig):
            if with_m or o is not m[0]:
                assert (x - y).abs().max().item() <= 1e-6 * max(1.0, y.abs().max().item())
    assert not torch.equal(a[0][-1], p[-1])


def test_stats_and_flags_equal_foreach(monkeypatch):
    monkeypatch.setattr(K, "MULTI_MIN_TENSORS", 2)
    seen = _count(monkeypatch)
    _, g, _, _, m = _tensors(1)
    for label, patch, flags in (("clean", None, (0.0, 0.0)), ("nan", float("nan"), (1.0,)),
                                ("inf", float("inf"), (1.0,)), ("overflow", 1e20, (0.0, 1.0))):
        gs = [t.clone() for t in g]
        if patch is not None:
            gs[3][5] = patch
        got = K.ascent_stats(m, gs, beta_m=0.9, impl="auto")
        ref = eager.ascent_stats(m, gs, beta_m=0.9, foreach=True)
        assert got[1:].tolist() == ref[1:].tolist(), label
        assert got[1:].tolist()[:len(flags)] == list(flags), label
        if label == "clean":
            assert abs(got[0].item() - ref[0].item()) <= 1e-6 * ref[0].item()
    assert seen.count("stats") == 4
    flags_only = K.ascent_stats([], g, beta_m=None, impl="auto")
    assert flags_only.tolist() == [0.0, 0.0, 0.0] and seen.count("stats") == 5


def test_optimizer_with_many_small_tensors_follows_the_reference(monkeypatch):
    """Two groups of 70 small tensors (>= MULTI_MIN_TENSORS each), one param without a gradient some
    steps, an eval/train switch: the default path runs the multi-tensor kernel."""
    assert 69 >= K.MULTI_MIN_TENSORS
    seen = _count(monkeypatch)

    def run(make):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(n) * 0.1) for n in [7, 33] * 70]
        opt = make([{"params": ps[:70], "weight_decay": 0.1}, {"params": ps[70:], "weight_decay": 0.0}])
        opt.train()
        for k in range(12):
            for i, p in enumerate(ps):
                p.grad = None if (k % 3 == 2 and i == 0) else torch.sin(p.detach() * (i + 1) + k)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step()
            if k == 6:
                opt.eval()
                opt.train()
        opt.eval()
        return torch.cat([p.detach() for p in ps])

    hp = dict(lr=0.01, betas=(0.9, 0.999), warmup_steps=3, rho=0.05)
    ours = run(lambda g: AdamWMSAMScheduleFree(g, **hp))
    assert seen.count("update_") == 12 * 2 and seen.count("stats") >= 12
    ref = run(lambda g: AdamWMSAMScheduleFreeReference(g, **hp))
    foreach = run(lambda g: AdamWMSAMScheduleFree(g, foreach=True, **hp))
    assert (foreach - ref).abs().max().item() <= 1e-5
    assert (ours - ref).abs().max().item() <= 1e-5
