"""The hand-written Triton implementation, for CUDA tensors with fp32 state.

Same math and the same two passes as :mod:`.compiled` (whose Inductor-generated kernels
remain the path for bf16 state and the CPU): a statistics pass (per-block float64
partial sums of ``||β_m·m + (1 − β_m)·g||²`` and per-block max|g|, from which torch
takes the sum and :func:`.rules.grad_flags`) and one update pass over p, g, z, v, m. A
Triton launch costs a few microseconds and compiles in about a second, with no dynamo
guards per call. Used for CUDA tensors when Triton is importable (and
``SHARDED_MSAM_SF_TRITON`` is not ``0``); tested on the CPU under ``TRITON_INTERPRET=1``
(``tests/test_fused_triton.py``), on a GPU by ``benchmarks/gpu_check.sh``.

The scalars are read by name: ``S_<SLOT>`` below is ``tl.constexpr(Slot.<SLOT>)`` for
every slot of :class:`.scalars.Slot`.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .rules import grad_flags
from .scalars import Slot

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:
    triton = tl = None
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "COMPILE_ERRORS", "usable", "stats", "update_"]

BLOCK = 1024
# Tests set this to run the kernels on CPU tensors under TRITON_INTERPRET=1.
ALLOW_CPU = False

if HAVE_TRITON:
    from triton.compiler.errors import CompilationError
    COMPILE_ERRORS: tuple = (CompilationError,)
    try:
        from triton.runtime.errors import OutOfResources
        COMPILE_ERRORS += (OutOfResources,)
    except ImportError:  # pragma: no cover - older Triton
        pass
    # the slots of the scalar layout, as compile-time constants the kernels read by name
    S_LR = tl.constexpr(int(Slot.LR))
    S_COEF_Y = tl.constexpr(int(Slot.COEF_Y))
    S_BETA2 = tl.constexpr(int(Slot.BETA2))
    S_ONE_MINUS_BETA2 = tl.constexpr(int(Slot.ONE_MINUS_BETA2))
    S_BC2 = tl.constexpr(int(Slot.BC2))
    S_EPS = tl.constexpr(int(Slot.EPS))
    S_WD = tl.constexpr(int(Slot.WD))
    S_CKP1 = tl.constexpr(int(Slot.CKP1))
    S_BETA_M = tl.constexpr(int(Slot.BETA_M))
    S_ONE_MINUS_BETA_M = tl.constexpr(int(Slot.ONE_MINUS_BETA_M))
    S_NEG_REMOVE = tl.constexpr(int(Slot.NEG_REMOVE))
    S_APPLY = tl.constexpr(int(Slot.APPLY))
else:
    COMPILE_ERRORS = ()


def usable(*tensors: Optional[Tensor]) -> bool:
    """Whether these (p, g, z, v[, m]) tensors can take the Triton kernels (fp32 state only)."""
    if not HAVE_TRITON or os.environ.get("SHARDED_MSAM_SF_TRITON", "1") == "0":
        return False
    p = tensors[0]
    if p.device.type != "cuda" and not (ALLOW_CPU and os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    state = [t for t in tensors[2:] if t is not None]
    return all(t.dtype == torch.float32 for t in state) and p.dtype in (torch.float32, torch.bfloat16, torch.float16)


_built = {}


def _kernels():
    """Build the kernels on first use (``triton.jit`` reads ``TRITON_INTERPRET`` when it
    decorates, so a test that sets it must come before the build), one set per mode."""
    key = os.environ.get("TRITON_INTERPRET") == "1"
    if key not in _built:
        @triton.jit
        def _stats_kernel(m_ptr, g_ptr, sum_ptr, amax_ptr, sc_ptr, n, BLOCK: tl.constexpr):
            pid = tl.program_id(0)
            beta_m = tl.load(sc_ptr + S_BETA_M)
            one_minus_beta_m = tl.load(sc_ptr + S_ONE_MINUS_BETA_M)
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            m = tl.load(m_ptr + offs, mask=mask, other=0.0)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            mn = m * beta_m + g * one_minus_beta_m
            mn64 = mn.to(tl.float64)
            tl.store(sum_ptr + pid, tl.sum(mn64 * mn64, axis=0))
            # max|g| with NaN counted as inf (Triton's max does not propagate NaN)
            a = tl.where(g == g, tl.abs(g), float("inf"))
            tl.store(amax_ptr + pid, tl.max(a, axis=0))

        @triton.jit
        def _update_kernel(p_ptr, g_ptr, z_ptr, v_ptr, m_ptr, sc_ptr, n, HAS_M: tl.constexpr, BLOCK: tl.constexpr):
            pid = tl.program_id(0)
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            lr = tl.load(sc_ptr + S_LR)
            coef_y = tl.load(sc_ptr + S_COEF_Y)
            beta2 = tl.load(sc_ptr + S_BETA2)
            omb2 = tl.load(sc_ptr + S_ONE_MINUS_BETA2)
            bc2 = tl.load(sc_ptr + S_BC2)
            eps = tl.load(sc_ptr + S_EPS)
            wd = tl.load(sc_ptr + S_WD)
            ckp1 = tl.load(sc_ptr + S_CKP1)
            p = tl.load(p_ptr + offs, mask=mask, other=0.0)
            y = p.to(tl.float32)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + offs, mask=mask, other=0.0)
            v = tl.load(v_ptr + offs, mask=mask, other=0.0)
            if HAS_M:
                beta_m = tl.load(sc_ptr + S_BETA_M)
                ombm = tl.load(sc_ptr + S_ONE_MINUS_BETA_M)
                neg_remove = tl.load(sc_ptr + S_NEG_REMOVE)
                apply = tl.load(sc_ptr + S_APPLY)
                m = tl.load(m_ptr + offs, mask=mask, other=0.0)
                y = y + neg_remove * m
                m = m * beta_m + ombm * g
            v = v * beta2 + omb2 * (g * g)
            u = g / (tl.sqrt(v / bc2) + eps) + wd * y
            # torch.lerp's formula (the branch is uniform over the launch)
            small = tl.abs(ckp1) < 0.5
            yl = tl.where(small, y + ckp1 * (z - y), z - (z - y) * (1.0 - ckp1))
            y = yl + coef_y * u
            z = z - lr * u
            if HAS_M:
                y = y + apply * m
                tl.store(m_ptr + offs, m, mask=mask)
            tl.store(p_ptr + offs, y.to(p_ptr.dtype.element_ty), mask=mask)
            tl.store(z_ptr + offs, z, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)
        _built[key] = (_stats_kernel, _update_kernel)
    return _built[key]


def stats(m: Tensor, g: Tensor, sc: Tensor) -> Tensor:
    """``[Σ(β_m·m + (1 − β_m)·g)², nonfinite, v_overflow]`` (float64) of two flat tensors."""
    n = m.numel()
    blocks = triton.cdiv(n, BLOCK)
    part = torch.empty(blocks, dtype=torch.float64, device=m.device)
    amax = torch.empty(blocks, dtype=torch.float32, device=m.device)
    _kernels()[0][(blocks,)](m, g, part, amax, sc.to(torch.float32), n, BLOCK=BLOCK)
    return torch.cat([part.sum().reshape(1), grad_flags(amax)])


def update_(p: Tensor, g: Tensor, z: Tensor, v: Tensor, m: Optional[Tensor], sc: Tensor) -> None:
    """One update pass over flat tensors; ``sc`` in the :mod:`.scalars` layout."""
    n = p.numel()
    sc32 = sc.to(torch.float32)
    _kernels()[1][(triton.cdiv(n, BLOCK),)](p, g, z, v, m if m is not None else z, sc32, n,
                                           HAS_M=m is not None, BLOCK=BLOCK)
