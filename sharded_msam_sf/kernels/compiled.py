"""The compiled implementation: the math as one expression per output, compiled by Inductor.

The optimizer step is pure memory traffic. Per parameter element, one one_pass step
reads g and m for the statistics pass (the sum of squares of the *new* momentum and
the gradient flags, reduced across ranks in one all-reduce), then a single update pass
reads g, p, z, v, m and writes p, z, v, m with the ascent scale already known: 44 bytes
per element in fp32 (36 for the update alone, against AdamW's 28). The multi-tensor
(foreach) path moves every intermediate through memory instead — about 3-4x more traffic.

The kernels are compiled with ``dynamic=True`` (C++/OpenMP on CPU, Triton on CUDA): a
tensor is flattened to 1-D and its length is symbolic, and the hyperparameters arrive
as one float64 tensor in the :mod:`.scalars` layout, so one compiled kernel serves every
tensor size and every step (one compile per dtype combination, cached on disk by
Inductor across processes). bf16 state is computed in fp32 and written back with
stochastic rounding inside the same kernel (:mod:`.bf16_state`).

Failures: an exception raised while compiling (:func:`compile_errors`: nothing has run,
nothing was written) disables the compiled kernels for that device type in the
:class:`FusedState` of the one optimizer that hit it — with ``impl="fused"`` it is a
``RuntimeError`` instead. Any other exception from an update kernel is raised as is,
wrapped in a message that says the step's tensors may be partly written: it is never
re-run eagerly on them.
"""
from __future__ import annotations

import os
import shutil
import threading
import warnings
from typing import Dict, Optional

import torch
from torch import Tensor

from . import triton as TK
from .bf16_state import r16s, round_to
from .rules import compute_dtype, grad_compute_dtype, grad_flags, is_low
from .scalars import unpack

__all__ = ["FusedState", "compile_errors", "available", "unavailable_reason", "call", "counters"]


_errors: Dict[str, tuple] = {}


def compile_errors() -> tuple:
    """The exception classes raised while compiling (nothing has run yet): dynamo's and
    Inductor's (imported on first use: importing torch._dynamo takes seconds) and Triton's."""
    if "all" not in _errors:
        import torch._dynamo.exc as dexc
        import torch._inductor.exc as iexc
        names = ("BackendCompilerFailed", "Unsupported", "FailOnRecompileLimitHit", "RecompileError",
                 "TorchRuntimeError", "InternalTorchDynamoError")
        errs = tuple(getattr(dexc, n) for n in names if hasattr(dexc, n))
        errs += tuple(getattr(iexc, n) for n in ("InductorError", "CppCompileError", "CUDACompileError")
                      if hasattr(iexc, n))
        _errors["all"] = errs + TK.COMPILE_ERRORS
        _errors["limit"] = tuple(e for e in errs if "RecompileLimit" in e.__name__)
    return _errors["all"]


_counters = {"calls": 0, "triton_calls": 0}


def counters() -> Dict[str, int]:
    """How many compiled-kernel calls were made in this process (tests and benchmarks)."""
    return dict(_counters)


class FusedState:
    """One optimizer's record of what failed: ``failed[device_type]`` (a reason) for the
    compiled kernels, ``triton_failed[device_type]`` for the Triton ones, and which
    warnings it already gave. Another optimizer in the process is not affected."""

    def __init__(self) -> None:
        self.failed: Dict[str, str] = {}
        self.triton_failed: Dict[str, str] = {}
        self.warned: set = set()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=5)

    def __repr__(self) -> str:
        return f"FusedState(failed={self.failed}, triton_failed={self.triton_failed})"


# ----------------------------------------------------------------------------- kernels
def _lerp(start: Tensor, end: Tensor, w: Tensor) -> Tensor:
    """``torch.lerp`` with eager's formula (``w`` a 0-d tensor in the compute dtype)."""
    return torch.where(w.abs() < 0.5, start + w * (end - start), end - (end - start) * (1 - w))


def _flags(g: Tensor) -> Tensor:
    return grad_flags(g.to(grad_compute_dtype(g)).abs().amax())


def _stats_kernel(m: Tensor, g: Tensor, sc: Tensor) -> Tensor:
    cdt = compute_dtype(m.dtype)
    s = unpack(sc.to(cdt))
    mn = m.to(cdt) * s.beta_m + g.to(cdt) * s.one_minus_beta_m
    sumsq = mn.to(torch.float64).square().sum()
    return torch.cat([sumsq.reshape(1), _flags(g)])


def _flag_kernel(g: Tensor) -> Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.float64, device=g.device), _flags(g)])


def _update_m_kernel(p: Tensor, g: Tensor, z: Tensor, v: Tensor, m: Tensor, sc: Tensor, seed: int) -> None:
    cdt = compute_dtype(z.dtype)
    s = unpack(sc.to(cdt))
    gf, zf, vf, mf = g.to(cdt), z.to(cdt), v.to(cdt), m.to(cdt)
    y = p.to(cdt) + s.neg_remove * mf                       # remove the current ascent
    mn = mf * s.beta_m + s.one_minus_beta_m * gf            # fold g into m
    vn = vf * s.beta2 + s.one_minus_beta2 * (gf * gf)
    u = gf / (torch.sqrt(vn / s.bc2) + s.eps) + s.wd * y
    yn = _lerp(y, zf, s.ckp1) + s.coef_y * u
    zn = zf - s.lr * u
    pn = yn + s.apply * mn                                  # apply the new ascent
    rz, rv, rm = r16s(p.numel(), seed, p.device) if (is_low(z) or is_low(v) or is_low(m)) else (None,) * 3
    p.copy_(pn)
    z.copy_(round_to(zn, z.dtype, rz))
    v.copy_(round_to(vn, v.dtype, rv))
    m.copy_(round_to(mn, m.dtype, rm))


def _update_kernel(p: Tensor, g: Tensor, z: Tensor, v: Tensor, sc: Tensor, seed: int) -> None:
    cdt = compute_dtype(z.dtype)
    s = unpack(sc.to(cdt))
    gf, zf, vf = g.to(cdt), z.to(cdt), v.to(cdt)
    y = p.to(cdt)
    vn = vf * s.beta2 + s.one_minus_beta2 * (gf * gf)
    u = gf / (torch.sqrt(vn / s.bc2) + s.eps) + s.wd * y
    yn = _lerp(y, zf, s.ckp1) + s.coef_y * u
    zn = zf - s.lr * u
    rz, rv, _ = r16s(p.numel(), seed, p.device) if (is_low(z) or is_low(v)) else (None,) * 3
    p.copy_(yn)
    z.copy_(round_to(zn, z.dtype, rz))
    v.copy_(round_to(vn, v.dtype, rv))


def _fold_kernel(m: Tensor, g: Tensor, sc: Tensor, seed: int) -> None:
    """two_pass's ``m ← β_m·m + (1 − β_m)·g`` in one pass (12 bytes/element in fp32, against
    20 for foreach's ``mul_`` then ``add_``); a bf16 m is rounded with the fold's random bits."""
    cdt = compute_dtype(m.dtype)
    s = unpack(sc.to(cdt))
    mn = m.to(cdt) * s.beta_m + g.to(cdt) * s.one_minus_beta_m
    rm = r16s(m.numel(), seed, m.device)[2] if is_low(m) else None
    m.copy_(round_to(mn, m.dtype, rm))


def _shift_kernel(p: Tensor, m: Tensor, sc: Tensor) -> None:
    """``p ← p + s·m`` (``s`` in the APPLY slot), computed in the wider of the two dtypes,
    p rounded to nearest (as :func:`.eager.add_scaled_`)."""
    cdt = torch.promote_types(p.dtype, m.dtype)
    s = unpack(sc.to(cdt))
    p.copy_(p.to(cdt) + s.apply * m.to(cdt))


_RAW = {"stats": _stats_kernel, "flag": _flag_kernel, "update_m": _update_m_kernel, "update": _update_kernel,
        "fold": _fold_kernel, "shift": _shift_kernel}
WRITES = ("update_m", "update", "fold", "shift")   # the kernels that write their arguments
_compiled: dict = {}
_lock = threading.Lock()


def _kernel(name: str):
    fn = _compiled.get(name)
    if fn is None:
        with _lock:
            fn = _compiled.get(name)
            if fn is None:
                fn = _compiled[name] = torch.compile(_RAW[name], dynamic=True, fullgraph=True)
    return fn


# ----------------------------------------------------------------------------- availability
def _has_cxx() -> bool:
    cxx = os.environ.get("CXX")
    return bool((cxx and shutil.which(cxx)) or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"))


_reasons: Dict[str, Optional[str]] = {}   # the toolchain, once per device type (a process-wide fact)


def _toolchain_reason(device: torch.device) -> Optional[str]:
    try:
        import torch._dynamo
        if torch._dynamo.config.disable or not torch._dynamo.is_dynamo_supported():
            return "torch.compile is disabled or not supported on this Python"
    except ImportError as e:  # pragma: no cover - broken installs
        return f"torch._dynamo unavailable ({e})"
    if device.type == "cpu":
        return None if _has_cxx() else "no C++ compiler (g++/c++/clang++ or $CXX) for Inductor's CPU kernels"
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "Triton is not installed"
    return f"no fused kernel for device type {device.type!r}"


def unavailable_reason(device: torch.device, state: Optional[FusedState] = None) -> Optional[str]:
    """Why the compiled kernels cannot run on ``device`` for this optimizer (None: they can)."""
    if state is not None and device.type in state.failed:
        return state.failed[device.type]
    if os.environ.get("SHARDED_MSAM_SF_FUSED", "1") == "0":
        return "SHARDED_MSAM_SF_FUSED=0"
    if device.type not in _reasons:  # the toolchain checks are slow (PATH lookups)
        _reasons[device.type] = _toolchain_reason(device)
    return _reasons[device.type]


def available(device="cpu") -> bool:
    """Whether the compiled kernels can run on ``device`` (no compilation is attempted)."""
    return unavailable_reason(torch.device(device)) is None


def _first_line(err: BaseException) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _triton_call(name: str, args, state: FusedState):
    """The hand-written Triton kernel for these arguments (CUDA, fp32 state), else None."""
    if not TK.HAVE_TRITON or args[0].device.type in state.triton_failed:
        return None
    if name == "stats" and TK.usable(args[1], args[1], args[0]):
        return lambda: TK.stats(*args)
    if name == "update_m" and TK.usable(*args[:5]):
        return lambda: TK.update_(*args[:5], args[5])
    if name == "update" and TK.usable(*args[:4]):
        return lambda: TK.update_(*args[:4], None, args[4])
    return None


def call(state: FusedState, impl: str, name: str, *args):
    """Run one kernel. Returns its output (True for the update kernels), or None when it
    did not run and wrote nothing (a compile failure, with ``impl="auto"``): the caller
    then takes the eager path for these tensors."""
    device = args[0].device
    tri = _triton_call(name, args, state)
    if tri is not None:
        try:
            out = tri()
        except TK.COMPILE_ERRORS as err:  # raised at the JIT build, before the launch
            state.triton_failed[device.type] = _first_line(err)
            state.warn_once(f"triton:{device.type}", "AdamWMSAMScheduleFree: the Triton kernels failed to build "
                            f"({_first_line(err)}); this optimizer uses the Inductor kernels on {device.type}")
        else:
            _counters["calls"] += 1
            _counters["triton_calls"] += 1
            return True if out is None else out
    errors = compile_errors()
    try:
        out = _kernel(name)(*args)
    except _errors["limit"]:
        # too many dtype/alignment variants of one kernel: this tensor goes eager, the others stay fused
        state.warn_once(f"limit:{name}", "AdamWMSAMScheduleFree: torch.compile's recompile limit was hit for the "
                        f"fused {name} kernel; tensors needing a new variant use the foreach path")
        return None
    except errors as err:
        reason = state.failed[device.type] = f"torch.compile failed: {_first_line(err)}"
        if impl == "fused":
            raise RuntimeError(f"AdamWMSAMScheduleFree(fused=True): {reason}; "
                               "use fused=None (falls back to foreach) or foreach=True") from err
        warn_fallback(state, device, reason)
        return None
    except Exception as err:
        if name in WRITES:
            raise RuntimeError(f"AdamWMSAMScheduleFree: the fused {name} kernel failed while running "
                               f"({_first_line(err)}); the params and state it was given may be partly written, "
                               "so the step is not re-run: restore from a checkpoint, or use foreach=True") from err
        raise
    _counters["calls"] += 1
    return True if out is None else out


def warn_fallback(state: FusedState, device: torch.device, reason: str) -> None:
    state.warn_once(f"fallback:{device.type}", f"AdamWMSAMScheduleFree: the fused step is unavailable ({reason}); "
                    f"this optimizer uses the foreach path on {device.type} from now on")
