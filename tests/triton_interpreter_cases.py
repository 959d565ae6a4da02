"""Triton kernel cases, run by tests/test_fused_triton.py in a child process with
``TRITON_INTERPRET=1`` set before Triton is imported (not collected on their own)."""
from __future__ import annotations

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_fused_triton.py"

from sharded_msam_sf import AdamWMSAMScheduleFree, AdamWMSAMScheduleFreeReference  # noqa: E402
from sharded_msam_sf import kernels as K  # noqa: E402
from sharded_msam_sf.kernels import eager as F  # noqa: E402
from sharded_msam_sf.kernels import triton as TK  # noqa: E402

from tests.test_fused import HP, run  # noqa: E402

@pytest.fixture
def triton_on_cpu(monkeypatch):
    monkeypatch.setattr(TK, "ALLOW_CPU", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_kernels_equal_eager(triton_on_cpu):
    g = torch.Generator().manual_seed(0)
    n = 3000  # several blocks, a ragged tail
    p, gr, z, m = (torch.randn(n, generator=g) for _ in range(4))
    v = torch.rand(n, generator=g)
    kw = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, ckp1=0.3, bias_correction2=0.05,
              beta_m=0.9, remove_scale=0.7, apply_scale=-0.4)
    a = [t.clone() for t in (p, gr, z, v, m)]
    b = [t.clone() for t in (p, gr, z, v, m)]
    K.sf_adamw_update_([a[0]], [a[1]], [a[2]], [a[3]], [a[4]], impl="fused", **kw)
    F.sf_adamw_update_([b[0]], [b[1]], [b[2]], [b[3]], [b[4]], foreach=True, **kw)
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() <= 1e-6
    s1 = K.ascent_stats([m], [gr], beta_m=0.9, impl="fused")
    s2 = F.ascent_stats([m], [gr], beta_m=0.9, foreach=True)
    assert abs(s1[0].item() - s2[0].item()) <= 1e-5 * s2[0].item() and s1[1].item() == 0.0
    gr[5] = float("inf")
    assert K.ascent_stats([m], [gr], beta_m=0.9, impl="fused")[1].item() == 1.0
    gr[5] = 1e30  # finite, but its square overflows fp32: the v-overflow flag, not the skip flag
    assert K.ascent_stats([m], [gr], beta_m=0.9, impl="fused")[1:].tolist() == [0.0, 1.0]
    gr[5] = float("nan")  # Triton's max drops NaN: the kernel counts it as inf
    assert K.ascent_stats([m], [gr], beta_m=0.9, impl="fused")[1].item() == 1.0


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_triton_trajectory(triton_on_cpu, mode):
    before = K.compile_counters()["triton_calls"]
    tri, _ = run(lambda gr: AdamWMSAMScheduleFree(gr, sam_mode=mode, fused=True, **HP), mode, steps=12, nan_at=5)
    assert K.compile_counters()["triton_calls"] > before
    fe, _ = run(lambda gr: AdamWMSAMScheduleFree(gr, sam_mode=mode, foreach=True, **HP), mode, steps=12, nan_at=5)
    ref, _ = run(lambda gr: AdamWMSAMScheduleFreeReference(gr, sam_mode=mode, **HP), mode, steps=12, nan_at=5)
    assert (tri - fe).abs().max().item() <= 2e-6
    assert (tri - ref).abs().max().item() <= 1e-5
