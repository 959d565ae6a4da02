"""state_dtype=torch.bfloat16: stochastic rounding is unbiased, the optimizer state is
half the size, every path rounds alike, checkpoints resume exactly, and the training
trajectory stays close to the fp32-state one (the measured effect is in
docs/performance.md; benchmarks/state_dtype.py measures it on a larger model)."""
from __future__ import annotations

import functools

import io

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree
from sharded_msam_sf import kernels as K
from sharded_msam_sf.kernels.bf16_state import random_bits, round_to, stochastic_round_bf16

from . import models
from .models import batch, decay_groups, flat, mse, one_step, tiny_mlp

HP = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, warmup_steps=5, weight_decay=0.0)
SIZES = (5, 16, 4)


def sr(x: torch.Tensor, seed: int) -> torch.Tensor:
    return stochastic_round_bf16(x, random_bits(x.numel(), seed, x.device) & 0xFFFF)


def neighbours(x: torch.Tensor):
    """The bf16 values just below and above |x| (truncation and truncation + 1 ulp), signed."""
    bits = x.view(torch.int32) & -65536
    lo = bits.view(torch.float32)
    hi = (bits + 65536).view(torch.float32)
    return lo, hi


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, generator=g) * torch.logspace(-6, 3, 2000)
    x[::7] *= -1
    lo, hi = neighbours(x)
    ulp = (hi - lo).abs()
    n = 400
    draws = torch.stack([sr(x, seed).float() for seed in range(2, 2 + n)])
    # every draw is one of the two neighbours
    assert ((draws == lo) | (draws == hi)).all()
    # the mean is x within 5 standard errors (std of one draw <= ulp/2)
    err = (draws.double().mean(0) - x.double()).abs()
    assert (err <= 5 * ulp.double() / 2 / n ** 0.5).all(), (err / ulp).max()
    # round-to-nearest is biased where the mean is not: x = 1 + ulp/4
    y = torch.full((1,), 1.0 + 2 ** -7 / 4)
    assert y.to(torch.bfloat16).float().item() == 1.0
    mean = torch.stack([sr(y, seed).float() for seed in range(2, 2 + 2000)]).mean().item()
    assert abs(mean - y.item()) < 2 ** -7 / 20


def test_representable_values_and_specials_are_kept():
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, float("inf"), float("-inf")])
    r = round_to(x, torch.bfloat16, random_bits(x.numel(), 99, x.device) & 0xFFFF)
    assert torch.equal(r[:4].float(), x[:4])
    assert r[5].item() == float("inf") and r[6].item() == float("-inf")
    nan = round_to(torch.tensor([float("nan")]), torch.bfloat16, torch.tensor([65535]))
    assert torch.isnan(nan).all()


def test_second_moment_ema_does_not_stall():
    """v ← 0.999·v + 0.001·g² with g² = 1 from v = 0.25: round-to-nearest in bf16 never
    moves (each increment is below half an ulp); stochastic rounding tracks fp32."""
    v32 = torch.full((4096,), 0.25)
    v_near = v32.to(torch.bfloat16)
    v_sr = v32.to(torch.bfloat16)
    for k in range(300):
        v32 = v32 * 0.999 + 0.001
        v_near = (v_near.float() * 0.999 + 0.001).to(torch.bfloat16)
        v_sr = sr(v_sr.float() * 0.999 + 0.001, 10 + k)
    assert v_near.float().mean().item() == 0.25
    assert abs(v_sr.float().mean().item() - v32.mean().item()) < 0.002


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def train(state_dtype, mode="one_pass", steps=40, impl=None, seed=0):
    model = tiny_mlp(seed=seed, sizes=SIZES)
    x, y = batch(d_in=SIZES[0], d_out=SIZES[-1])
    kw = {} if impl is None else ({"fused": True} if impl == "fused" else {"foreach": impl == "foreach"})
    opt = AdamWMSAMScheduleFree(decay_groups(model), sam_mode=mode, state_dtype=state_dtype, **kw, **HP)
    flat_final = train_loop(model, opt, x, y, steps, mode)
    return flat_final, opt, mse(model, x, y).item()


def train_loop(model, opt, x, y, steps, mode):
    return models.train_loop(model, opt, x, y, steps, mode, switch_at=steps // 2)


def test_memory_is_halved():
    _, o32, _ = train(None, steps=2)
    _, o16, _ = train(torch.bfloat16, steps=2)
    assert all(t.dtype == torch.bfloat16 for s in o16.state.values() for t in s.values())
    assert state_bytes(o16) * 2 == state_bytes(o32)


@functools.lru_cache(maxsize=None)
def _foreach_bf16_weights(mode):
    return train(torch.bfloat16, mode, impl="foreach")[0]


@pytest.mark.parametrize("impl", ["single", pytest.param("fused", marks=pytest.mark.skipif(
    not K.compile_available("cpu"), reason="torch.compile unavailable on CPU: the fused bf16-state path is untested"))])
@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_paths_round_alike(mode, impl):
    """single and fused use the same random bits as foreach: the same trajectory up to rare
    one-ulp rounding flips."""
    base = _foreach_bf16_weights(mode)
    w = train(torch.bfloat16, mode, impl=impl)[0]
    assert (w - base).abs().max().item() <= 2e-3, impl


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_trajectory_close_to_fp32_state(mode):
    """The measured effect: final weights and loss of a 60-step run, bf16 vs fp32 state."""
    w32, _, loss32 = train(None, mode, steps=60, impl="foreach")
    w16, _, loss16 = train(torch.bfloat16, mode, steps=60, impl="foreach")
    start = flat(tiny_mlp(sizes=SIZES))
    rel = ((w16 - w32).norm() / (w32 - start).norm()).item()
    assert rel < 0.05, rel
    assert abs(loss16 - loss32) <= 0.05 * loss32, (loss16, loss32)


def test_resume_is_exact():
    """The rounding seeds derive from the step counter: a checkpoint at step 10, loaded
    into a fresh optimizer, continues bit for bit."""
    x, y = batch(d_in=SIZES[0], d_out=SIZES[-1])

    def make(model):
        return AdamWMSAMScheduleFree(decay_groups(model), state_dtype=torch.bfloat16, foreach=True, **HP)

    m1 = tiny_mlp(sizes=SIZES)
    o1 = make(m1)
    o1.train()
    for i in range(20):
        one_step(m1, o1, x, y)
        if i == 9:
            buf = io.BytesIO()
            torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = tiny_mlp(sizes=SIZES)
    m2.load_state_dict(ck["model"])
    o2 = make(m2)
    o2.load_state_dict(ck["opt"])
    assert all(t.dtype == torch.bfloat16 for s in o2.state.values() for t in s.values())
    for _ in range(10):
        one_step(m2, o2, x, y)
    assert torch.equal(flat(m1), flat(m2))


def test_invalid_state_dtype():
    with pytest.raises(ValueError, match="state_dtype"):
        AdamWMSAMScheduleFree([torch.nn.Parameter(torch.zeros(2))], state_dtype=torch.float16)
