"""bf16 optimizer state (``state_dtype=torch.bfloat16``): stochastic rounding, in one place.

bf16 keeps the top 16 bits of an fp32 number. Rounding to nearest loses every update
smaller than half an ulp (``2^-9`` relative), which stalls EMAs such as
``v ← β2·v + (1 − β2)·g²`` (each increment is ``1e-3`` relative). Stochastic rounding
adds a uniform random integer ``r ∈ [0, 2^16)`` to the fp32 bit pattern and then
truncates the low 16 bits, so a value ``a + f·ulp`` (``0 ≤ f < 1``) becomes ``a + ulp``
with probability ``f`` and ``a`` otherwise: unbiased, ``E[round(x)] = x``.

The random bits come from a hash of (element index, seed) — no generator state, the
same numbers in the eager paths and inside a compiled kernel, and reproducible: the
seed derives from the step counter and the tensor's position (:func:`step_seed`), so a
run resumed from a checkpoint rounds exactly as the uninterrupted one.

Every path computes bf16 state in fp32 and writes it back through :func:`round_to`:
the compiled kernels call it inside the kernel; the eager paths go through
:func:`update_` and :func:`fold_` below, which run the eager math on fp32 copies.
The Triton kernels take fp32 state only. Everything here is plain tensor code.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .rules import LOW_PRECISION_STATE, is_low

__all__ = ["hash32", "random_bits", "r16s", "stochastic_round_bf16", "round_to", "step_seed", "LOW_PRECISION_STATE",
           "update_", "fold_", "fp32_view"]

_M32 = 0xFFFFFFFF
_C = 0x45D9F3B          # < 2^31: products of 32-bit values stay below 2^63 in int64
_GOLDEN = 0x9E3779B1
SALT_UPDATE = 0         # the update's random bits
SALT_FOLD = 1           # two_pass's fold of m in move_to_ascent()


def hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mix (int64 tensor in, values in ``[0, 2^32)`` out)."""
    x = x & _M32
    x = (((x >> 16) ^ x) * _C) & _M32
    x = (((x >> 16) ^ x) * _C) & _M32
    return (x >> 16) ^ x


def random_bits(n: int, seed, device) -> Tensor:
    """``n`` 32-bit random integers (int64) for element indices ``0..n−1`` and ``seed``."""
    idx = torch.arange(n, device=device, dtype=torch.int64)
    return hash32(idx * _GOLDEN + seed)


def r16s(n: int, seed, device):
    """Three 16-bit random integer tensors (for z, v, m) from one 32-bit hash per element:
    each 16-bit slice is uniform, which is all unbiasedness needs (m's slice overlaps
    z's and v's; a correlation between their rounding errors is harmless)."""
    h = random_bits(n, seed, device)
    return h & 0xFFFF, h >> 16, (h >> 8) & 0xFFFF


def stochastic_round_bf16(x: Tensor, r16: Tensor) -> Tensor:
    """Round fp32 ``x`` to bf16 stochastically with the random integers ``r16 ∈ [0, 2^16)``.

    Adding ``r16`` to the bit pattern adds to the magnitude for either sign (fp32 is
    sign-magnitude), so the rounding is unbiased for negative numbers too; the result
    after clearing the low 16 bits is exactly representable in bf16.
    """
    bits = x.view(torch.int32)
    bits = (bits + r16.to(torch.int32)) & -65536  # 0xFFFF0000
    return bits.view(torch.float32).to(torch.bfloat16)


def round_to(x: Tensor, dtype: torch.dtype, r16: Optional[Tensor]) -> Tensor:
    """``x`` in ``dtype``: stochastic rounding for bf16, a plain cast otherwise.

    Non-finite values are kept as they are (the bit trick could turn a NaN payload into inf)."""
    if dtype == torch.bfloat16 and x.dtype == torch.float32:
        return torch.where(torch.isfinite(x), stochastic_round_bf16(x, r16), x.to(torch.bfloat16))
    return x.to(dtype)


def step_seed(k: int, index: int, salt: int = SALT_UPDATE) -> int:
    """The seed of the random bits for step ``k`` (0-based) and tensor ``index``: a 31-bit
    value >= 2 (0 and 1 would be specialised by torch.compile)."""
    h = (k * 0x632BE5AB + index * 0x85EBCA77 + salt * 0x27D4EB2F + 0x165667B1) & 0x7FFFFFFF
    return h if h >= 2 else h + 2


def fp32_view(ts: Sequence[Tensor]) -> list:
    """Read-only fp32 copies of bf16 state (the others as they are), for the statistics."""
    return [t.float() if is_low(t) else t for t in ts]


def _write_back(dst: Tensor, src: Tensor, r16: Tensor) -> None:
    dst.copy_(round_to(src.reshape(-1), dst.dtype, r16).view_as(dst))


def update_(eager_update: Callable, p: Tensor, g: Tensor, z: Tensor, v: Tensor, m: Optional[Tensor], *,
            index: int, step: int, **kw) -> None:
    """One eager update of a param with bf16 state: the math on fp32 copies of z, v, m,
    then each written back stochastically rounded (the seeds the compiled kernel uses)."""
    z32, v32 = z.float(), v.float()
    m32 = None if m is None else m.float()
    eager_update([p], [g], [z32], [v32], None if m32 is None else [m32], **kw)
    rz, rv, rm = r16s(p.numel(), step_seed(step, index), p.device)
    _write_back(z, z32, rz)
    _write_back(v, v32, rv)
    if m is not None:
        _write_back(m, m32, rm)


def fold_(eager_fold: Callable, m: Tensor, g: Tensor, beta_m: float, *, index: int, step: int, **kw) -> None:
    """``m ← β_m·m + (1 − β_m)·g`` for a bf16 m: folded in fp32, written back stochastically rounded."""
    m32 = m.float()
    eager_fold([m32], [g], beta_m, **kw)
    _, _, rm = r16s(m.numel(), step_seed(step, index, salt=SALT_FOLD), m.device)
    _write_back(m, m32, rm)
