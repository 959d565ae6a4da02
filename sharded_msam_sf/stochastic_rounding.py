"""Stochastic rounding of fp32 values to bfloat16, with a counter-based random source.

bf16 keeps the top 16 bits of an fp32 number. Rounding to nearest loses every update
smaller than half an ulp (``2^-9`` relative), which stalls EMAs such as
``v ← β2·v + (1 − β2)·g²`` (each increment is ``1e-3`` relative). Stochastic rounding
adds a uniform random integer ``r ∈ [0, 2^16)`` to the fp32 bit pattern and then
truncates the low 16 bits, so a value ``a + f·ulp`` (``0 ≤ f < 1``) becomes ``a + ulp``
with probability ``f`` and ``a`` otherwise: unbiased, ``E[round(x)] = x``.

The random bits come from a hash of (element index, seed) — no generator state, the
same numbers in the eager paths and inside a compiled kernel, and reproducible: the
optimizer derives the seed from the step counter and the tensor's position, so a run
resumed from a checkpoint rounds exactly as the uninterrupted one.

Everything here is plain tensor code: it runs eagerly and is traced by
``torch.compile`` into the fused update kernel (``fused_compile.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hash32", "random_bits", "stochastic_round_bf16", "round_to", "step_seed", "LOW_PRECISION_STATE"]

_M32 = 0xFFFFFFFF
_C = 0x45D9F3B          # < 2^31: products of 32-bit values stay below 2^63 in int64
_GOLDEN = 0x9E3779B1
LOW_PRECISION_STATE = (torch.bfloat16,)


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


def stochastic_round_bf16(x: Tensor, r16: Tensor) -> Tensor:
    """Round fp32 ``x`` to bf16 stochastically with the random integers ``r16 ∈ [0, 2^16)``.

    Adding ``r16`` to the bit pattern adds to the magnitude for either sign (fp32 is
    sign-magnitude), so the rounding is unbiased for negative numbers too; the result
    after clearing the low 16 bits is exactly representable in bf16.
    """
    bits = x.view(torch.int32)
    bits = (bits + r16.to(torch.int32)) & -65536  # 0xFFFF0000
    return bits.view(torch.float32).to(torch.bfloat16)


def round_to(x: Tensor, dtype: torch.dtype, r16: Tensor) -> Tensor:
    """``x`` in ``dtype``: stochastic rounding for bf16, a plain cast otherwise.

    Non-finite values are kept as they are (the bit trick could turn a NaN payload into inf)."""
    if dtype == torch.bfloat16 and x.dtype == torch.float32:
        return torch.where(torch.isfinite(x), stochastic_round_bf16(x, r16), x.to(torch.bfloat16))
    return x.to(dtype)


def step_seed(k: int, index: int, salt: int = 0) -> int:
    """The seed of the random bits for step ``k`` (0-based) and tensor ``index``: a 31-bit
    value >= 2 (0 and 1 would be specialised by torch.compile)."""
    h = (k * 0x632BE5AB + index * 0x85EBCA77 + salt * 0x27D4EB2F + 0x165667B1) & 0x7FFFFFFF
    return h if h >= 2 else h + 2
