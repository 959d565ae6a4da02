"""The rules every implementation of the math shares, each written once.

- **Compute dtype (the fp32-state precondition).** The math runs in the dtype of the
  state (z, v, m) when that is fp32 or fp64. bf16 state is computed in fp32 and written
  back stochastically rounded (:mod:`.bf16_state`); no other low-precision state exists.
  The eager kernels write the state in place in its own dtype, so they require state in
  a compute dtype (:func:`require_compute_state`); the compiled kernels cast inside.
- **Gradient flags.** From ``a = max|g|`` over a set of gradient elements, taken in the
  compute dtype (NaN counted as non-finite):

  - ``nonfinite = a is not finite``: some gradient element is NaN or ±inf, the step is
    skipped (a sum of squares would also flag large finite gradients; a max cannot);
  - ``v_overflow = a is finite and a·a is inf``: some finite ``g`` has a square that
    overflows the compute dtype, so ``v ← β2·v + (1 − β2)·g²`` becomes inf and that
    element's update ``g / (sqrt(v/bc2) + eps)`` is 0 from then on (the step runs; the
    optimizer warns and counts it).

  Every implementation reduces max|g| its own way (per tensor, per block) and calls
  :func:`grad_flags`, which gives ``[nonfinite, v_overflow]`` as float64 0/1. Across
  ranks the two travel as one scalar (:func:`encode_flags`: ``inf`` if non-finite, else
  the overflow flag), which a SUM or a MAX all-reduce keeps meaningful (:func:`decode_flag`).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["LOW_PRECISION_STATE", "compute_dtype", "grad_compute_dtype", "is_low", "require_compute_state",
           "grad_flags", "no_flags",
           "encode_flags", "decode_flag"]

LOW_PRECISION_STATE = (torch.bfloat16,)


def compute_dtype(state_dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16 state, the state's own dtype otherwise."""
    return torch.float32 if state_dtype in LOW_PRECISION_STATE else state_dtype


def grad_compute_dtype(g: Tensor) -> torch.dtype:
    """The compute dtype of the update that will take ``g``: fp32 for bf16/fp16/fp32
    gradients (their state is fp32 or bf16), fp64 for fp64 gradients."""
    return torch.promote_types(g.dtype, torch.float32)


def is_low(t: Optional[Tensor]) -> bool:
    """Whether ``t`` is low-precision state (computed in fp32, stored rounded)."""
    return t is not None and t.dtype in LOW_PRECISION_STATE


def require_compute_state(tensors: Iterable[Optional[Tensor]], where: str) -> None:
    """The fp32-state precondition of the eager kernels (they write state in place)."""
    for t in tensors:
        if is_low(t):
            raise TypeError(f"{where}: state tensor of dtype {t.dtype} given to a kernel that writes the state in "
                            "its own dtype; bf16 state goes through sharded_msam_sf.kernels.bf16_state")


def grad_flags(amax: Tensor) -> Tensor:
    """``[nonfinite, v_overflow]`` (float64, each 0 or 1) from max|g| values in the compute dtype.

    ``amax`` may be 0-d or 1-d (one value per tensor or block); NaN counts as non-finite."""
    a = amax.reshape(-1)
    bad = (~torch.isfinite(a)).any()
    over = (torch.isfinite(a) & torch.isinf(a * a)).any()
    return torch.stack([bad, over]).to(torch.float64)


def no_flags(device) -> Tensor:
    """The flags of an empty set of gradients."""
    return torch.zeros(2, dtype=torch.float64, device=device)


def encode_flags(flags: Tensor) -> Tensor:
    """``[nonfinite, v_overflow]`` (any leading shape ``(..., 2)``) as one float64 value each:
    ``inf`` where non-finite, else ``v_overflow`` (0 or 1). Sums and maxima over ranks keep
    the meaning: inf iff some rank saw a non-finite gradient, > 0 iff some rank overflowed."""
    return torch.where(flags[..., 0] > 0, torch.full_like(flags[..., 1], float("inf")), flags[..., 1])


def decode_flag(value: float) -> Tuple[bool, bool]:
    """(nonfinite, v_overflow) from a reduced :func:`encode_flags` value."""
    nonfinite = not math.isfinite(value)
    return nonfinite, (not nonfinite) and value > 0
