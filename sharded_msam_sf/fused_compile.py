"""The fused step: ``torch.compile`` of the functional core, one kernel per tensor and pass.

The optimizer step is pure memory traffic. Per parameter element, one one_pass step
reads g and m for the statistics pass (the sum of squares of the *new* momentum and
the non-finite flag, reduced across ranks in one all-reduce), then a single update
pass reads g, p, z, v, m and writes p, z, v, m with the ascent scale already known:
44 bytes per element in fp32 (36 for the update alone, against AdamW's 28).
The multi-tensor (foreach) path moves every intermediate through memory instead —
about 3-4x more traffic.

The kernels below are the math of :mod:`sharded_msam_sf.functional` written as one
expression per output and compiled by Inductor (C++/OpenMP on CPU, Triton on
CUDA) with ``dynamic=True``: a tensor is flattened to 1-D and its length is symbolic,
and the hyperparameters are passed as Python floats (symbolic too), so one compiled
kernel serves every tensor size and every step (one compile per dtype combination,
cached on disk by Inductor across processes). Low-precision state (bf16 z, v, m)
is computed in fp32 and written back with stochastic rounding inside the same kernel
(:mod:`sharded_msam_sf.stochastic_rounding`).

Dispatch (:func:`ascent_stats`, :func:`sf_adamw_update_`) takes ``impl``:

- ``"fused"``: every contiguous CPU/CUDA tensor through the compiled kernels; if
  compilation is unavailable, a ``RuntimeError`` says why;
- ``"auto"`` (the optimizer's default): tensors with at least ``AUTO_MIN_NUMEL``
  elements through the compiled kernels (small ones do not pay back the per-call
  overhead), the rest through foreach; when compilation is unavailable (no C++
  compiler, no Triton, ``TORCHDYNAMO_DISABLE=1``, ``SHARDED_MSAM_SF_FUSED=0``) or
  fails, one warning and foreach from then on;
- ``"foreach"`` / ``"single"``: the eager paths of ``functional.py``.

Every path computes the same trajectory (tests/test_fused.py); they differ only
in floating-point rounding (fused multiply-adds, summation order of the norm).
"""
from __future__ import annotations

import os
import shutil
import threading
import warnings
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import functional as F
from . import triton_kernels as TK
from .stochastic_rounding import LOW_PRECISION_STATE, hash32, random_bits, round_to, step_seed

__all__ = [
    "IMPLS", "AUTO_MIN_NUMEL", "compile_available", "ascent_stats", "sf_adamw_update_", "fold_momentum_",
    "compile_counters",
]

IMPLS = ("auto", "fused", "foreach", "single")
AUTO_MIN_NUMEL = int(os.environ.get("SHARDED_MSAM_SF_FUSED_MIN_NUMEL", 1 << 18))
_lock = threading.Lock()
_state = {"failed": None, "warned": False, "calls": 0, "triton_calls": 0}


# ----------------------------------------------------------------------------- kernels
def _cdt(state_dtype: torch.dtype) -> torch.dtype:
    """The compute dtype for a state dtype: fp32 for bf16 state, the state's own otherwise."""
    return torch.float32 if state_dtype in LOW_PRECISION_STATE else state_dtype


def _r16s(n, seed, device):
    """Three independent 16-bit random integer tensors (for z, v, m)."""
    h = random_bits(n, seed, device)
    # one 32-bit hash per element: each 16-bit slice is uniform, which is all unbiasedness needs
    # (m's slice overlaps z's and v's; a correlation between their rounding errors is harmless)
    return h & 0xFFFF, h >> 16, (h >> 8) & 0xFFFF


def _lerp(start: Tensor, end: Tensor, w: Tensor) -> Tensor:
    """``torch.lerp`` with eager's formula (``w`` a 0-d tensor in the compute dtype)."""
    return torch.where(w.abs() < 0.5, start + w * (end - start), end - (end - start) * (1 - w))


# The hyperparameters travel in one float64 tensor (on the params' device): Python floats
# would be traced as symbolic floats, and some ops specialise (recompile) on their value.
# Index:      0   1       2      3                4    5    6   7     8       9                 10          11
_SC_NAMES = ("lr", "coef_y", "beta2", "one_minus_beta2", "bc2", "eps", "wd", "ckp1", "beta_m", "one_minus_beta_m",
             "neg_remove", "apply")


def _stats_kernel(m: Tensor, g: Tensor, sc: Tensor) -> Tensor:
    cdt = _cdt(m.dtype)
    mn = m.to(cdt) * sc[8].to(cdt) + g.to(cdt) * sc[9].to(cdt)
    sumsq = mn.to(torch.float64).square().sum()
    # a NaN/inf in g makes m_new, hence the float64 sum, non-finite (finite fp32 squares cannot
    # overflow it): one reduction instead of two. It also flags an m_new that overflowed fp32.
    bad = (~torch.isfinite(sumsq)).to(torch.float64)
    return torch.stack([sumsq, bad])


def _flag_kernel(g: Tensor) -> Tensor:
    return (~torch.isfinite(g)).any().to(torch.float64)


def _update_m_kernel(p: Tensor, g: Tensor, z: Tensor, v: Tensor, m: Tensor, sc: Tensor, seed: int) -> None:
    cdt = _cdt(z.dtype)
    lr, coef_y, beta2, omb2, bc2, eps, wd, ckp1, beta_m, ombm, neg_remove, apply = sc.to(cdt).unbind(0)
    gf, zf, vf, mf = g.to(cdt), z.to(cdt), v.to(cdt), m.to(cdt)
    y = p.to(cdt) + neg_remove * mf                        # remove the current ascent
    mn = mf * beta_m + ombm * gf                           # fold g into m
    vn = vf * beta2 + omb2 * (gf * gf)
    u = gf / (torch.sqrt(vn / bc2) + eps) + wd * y
    yn = _lerp(y, zf, ckp1) + coef_y * u
    zn = zf - lr * u
    pn = yn + apply * mn                                   # apply the new ascent
    if z.dtype in LOW_PRECISION_STATE or v.dtype in LOW_PRECISION_STATE or m.dtype in LOW_PRECISION_STATE:
        rz, rv, rm = _r16s(p.numel(), seed, p.device)
    else:
        rz = rv = rm = None
    p.copy_(pn)
    z.copy_(round_to(zn, z.dtype, rz))
    v.copy_(round_to(vn, v.dtype, rv))
    m.copy_(round_to(mn, m.dtype, rm))


def _update_kernel(p: Tensor, g: Tensor, z: Tensor, v: Tensor, sc: Tensor, seed: int) -> None:
    cdt = _cdt(z.dtype)
    lr, coef_y, beta2, omb2, bc2, eps, wd, ckp1 = sc.to(cdt).unbind(0)[:8]
    gf, zf, vf = g.to(cdt), z.to(cdt), v.to(cdt)
    y = p.to(cdt)
    vn = vf * beta2 + omb2 * (gf * gf)
    u = gf / (torch.sqrt(vn / bc2) + eps) + wd * y
    yn = _lerp(y, zf, ckp1) + coef_y * u
    zn = zf - lr * u
    if z.dtype in LOW_PRECISION_STATE or v.dtype in LOW_PRECISION_STATE:
        rz, rv, _ = _r16s(p.numel(), seed, p.device)
    else:
        rz = rv = None
    p.copy_(yn)
    z.copy_(round_to(zn, z.dtype, rz))
    v.copy_(round_to(vn, v.dtype, rv))


_compiled = {}


def _kernel(name: str):
    fn = _compiled.get(name)
    if fn is None:
        with _lock:
            fn = _compiled.get(name)
            if fn is None:
                raw = {"stats": _stats_kernel, "flag": _flag_kernel, "update_m": _update_m_kernel,
                       "update": _update_kernel}[name]
                fn = _compiled[name] = torch.compile(raw, dynamic=True, fullgraph=True)
    return fn


def compile_counters() -> dict:
    """How many compiled-kernel calls were made (for tests and benchmarks)."""
    return dict(_state)


# ----------------------------------------------------------------------------- availability
def _has_cxx() -> bool:
    cxx = os.environ.get("CXX")
    return bool((cxx and shutil.which(cxx)) or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"))


_reasons = {}


def _unavailable_reason(device: torch.device) -> Optional[str]:
    if _state["failed"] is not None:
        return _state["failed"]
    if os.environ.get("SHARDED_MSAM_SF_FUSED", "1") == "0":
        return "SHARDED_MSAM_SF_FUSED=0"
    if device.type not in _reasons:  # the toolchain checks are slow (PATH lookups): once per device type
        _reasons[device.type] = _toolchain_reason(device)
    return _reasons[device.type]


def _toolchain_reason(device: torch.device) -> Optional[str]:
    try:
        import torch._dynamo
        if torch._dynamo.config.disable or not torch._dynamo.is_dynamo_supported():
            return "torch.compile is disabled or not supported on this Python"
    except Exception as e:  # pragma: no cover - broken installs
        return f"torch._dynamo unavailable ({e})"
    if device.type == "cpu":
        return None if _has_cxx() else "no C++ compiler (g++/c++/clang++ or $CXX) for Inductor's CPU kernels"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
            return None if has_triton() else "Triton is not installed"
        except Exception:  # pragma: no cover
            return "Triton is not installed"
    return f"no fused kernel for device type {device.type!r}"


def compile_available(device="cpu") -> bool:
    """Whether the compiled kernels can run on ``device`` (no compilation is attempted)."""
    return _unavailable_reason(torch.device(device)) is None


def _fail(impl: str, err: BaseException) -> None:
    _state["failed"] = f"torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if impl == "fused":
        raise RuntimeError(f"AdamWMSAMScheduleFree(fused=True): {_state['failed']}; "
                           "use fused=None (falls back to foreach) or foreach=True") from err
    _warn_fallback(_state["failed"])


def _warn_fallback(reason: str) -> None:
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"AdamWMSAMScheduleFree: the fused step is unavailable ({reason}); "
                      "using the foreach path from now on", RuntimeWarning, stacklevel=4)


def _eligible(impl: str, tensors: Sequence[Optional[Tensor]], state: Sequence[Optional[Tensor]] = ()) -> bool:
    """Whether this (p, g, z, v[, m]) tuple goes through a compiled kernel (``state``: its z, v, m)."""
    if impl not in ("fused", "auto"):
        return False
    p = tensors[0]
    n = p.numel()
    # small tensors do not pay back a compiled call's overhead, except with bf16 state,
    # whose eager path (fp32 copies, rounding in separate ops) is slower still
    small_ok = any(t is not None and _is_low(t) for t in state)
    if n < 2 or (impl == "auto" and n < AUTO_MIN_NUMEL and not small_ok):
        return False  # (torch.compile specialises sizes 0 and 1: they would cost a compile each)
    if any(t is not None and (not t.is_contiguous() or t.numel() != n or t.device != p.device
                              or t.layout != torch.strided) for t in tensors):
        return False  # non-contiguous or odd layouts go eager, even when fused is asked
    reason = _unavailable_reason(p.device)
    if reason is None:
        return True
    if impl == "fused":
        raise RuntimeError(f"AdamWMSAMScheduleFree(fused=True): the fused step is unavailable ({reason}); "
                           "use fused=None (falls back to foreach) or foreach=True")
    if os.environ.get("SHARDED_MSAM_SF_FUSED", "1") != "0" and p.device.type in ("cpu", "cuda"):
        _warn_fallback(reason)  # (a missing toolchain for one device type leaves the others fused)
    return False


def _triton(name: str, args):
    """The hand-written Triton kernel for these arguments (CUDA, fp32 state), else None."""
    if name == "stats" and TK.usable(args[1], args[1], args[0]):
        return lambda: TK.stats(*args)
    if name == "update_m" and TK.usable(*args[:5]):
        return lambda: TK.update_(*args[:5], args[5])
    if name == "update" and TK.usable(*args[:4]):
        return lambda: TK.update_(*args[:4], None, args[4])
    return None


def _call(impl: str, name: str, *args) -> bool:
    """Run a compiled kernel; False (nothing written) if compilation failed and impl is auto."""
    tri = _triton(name, args) if TK.HAVE_TRITON else None
    if tri is not None:
        out = tri()
        _state["calls"] += 1
        _state["triton_calls"] += 1
        return out if out is not None else True
    try:
        out = _kernel(name)(*args)
    except Exception as err:  # noqa: BLE001 - any compiler/toolchain failure
        if "RecompileLimit" in type(err).__name__:
            # too many dtype/alignment variants of one kernel: this tensor goes eager, the others stay fused
            if not _state.get("warned_limit"):
                _state["warned_limit"] = True
                warnings.warn("AdamWMSAMScheduleFree: torch.compile's recompile limit was hit for the fused "
                              f"{name} kernel; tensors needing a new variant use the foreach path",
                              RuntimeWarning, stacklevel=4)
            return False
        _fail(impl, err)
        return False
    _state["calls"] += 1
    return out if out is not None else True


# ----------------------------------------------------------------------------- dispatch
def _scalars(device: torch.device, cache: dict, **values: float) -> Tensor:
    """The hyperparameter tensor for the kernels, built once per call and device."""
    sc = cache.get(device)
    if sc is None:
        row = [float(values.get(name, 0.0)) for name in _SC_NAMES]
        sc = cache[device] = torch.tensor(row, dtype=torch.float64).to(device, non_blocking=True)
    return sc


def _is_low(t: Tensor) -> bool:
    return t.dtype in LOW_PRECISION_STATE


def ascent_stats(ms: Sequence[Tensor], grads: Sequence[Tensor], *, beta_m: Optional[float], impl: str) -> Tensor:
    """:func:`functional.ascent_stats` (``[sumsq, nonfinite]``, float64) through ``impl``."""
    ms, grads = list(ms), list(grads)
    device = grads[0].device if grads else (ms[0].device if ms else torch.device("cpu"))
    rest_m, rest_g = [], []
    parts: List[Tensor] = []
    sc_cache: dict = {}
    if impl in ("fused", "auto") and (beta_m is not None or not ms):
        for i, g in enumerate(grads):
            m = ms[i] if ms else None
            if _eligible(impl, (g, m), (m,)):
                if m is not None:
                    sc = _scalars(g.device, sc_cache, beta_m=beta_m, one_minus_beta_m=1.0 - beta_m)
                    out = _call(impl, "stats", m.view(-1), g.view(-1), sc)
                else:
                    out = _call(impl, "flag", g.view(-1))
                    out = torch.stack([torch.zeros((), dtype=torch.float64, device=out.device), out]) \
                        if isinstance(out, Tensor) else out
                if isinstance(out, Tensor):
                    parts.append(out)
                    continue
            if m is not None:
                rest_m.append(m)
            rest_g.append(g)
        if not ms:
            rest_m = []
    else:
        rest_m, rest_g = ms, grads
    if rest_m or rest_g or not parts:
        fe = impl != "single"
        eager_ms = [m.float() if _is_low(m) else m for m in rest_m]
        parts.append(F.ascent_stats(eager_ms, rest_g, beta_m=beta_m, foreach=fe).to(device))
    if len(parts) == 1:
        return parts[0]
    stacked = torch.stack(parts)
    return torch.stack([stacked[:, 0].sum(), stacked[:, 1].amax()])


def sf_adamw_update_(
    params: Sequence[Tensor], grads: Sequence[Tensor], zs: Sequence[Tensor], vs: Sequence[Tensor],
    ms: Optional[Sequence[Tensor]], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    ckp1: float, bias_correction2: float, beta_m: Optional[float], remove_scale: float, apply_scale: float,
    impl: str, step: int = 0,
) -> None:
    """:func:`functional.sf_adamw_update_` through ``impl``; bf16 state gets stochastic rounding
    (seeded by ``step`` and the tensor's position, so every path rounds alike)."""
    if not len(params):
        return
    if ms is None and (remove_scale != 0.0 or apply_scale != 0.0):
        raise ValueError("an ascent scale needs the momentum tensors")
    fold = ms is not None and beta_m is not None
    coef_y = lr * (beta1 * (1.0 - ckp1) - 1.0)
    hyper = dict(lr=lr, coef_y=coef_y, beta2=beta2, one_minus_beta2=1.0 - beta2, bc2=bias_correction2, eps=eps,
                 wd=weight_decay, ckp1=ckp1, beta_m=0.0 if beta_m is None else beta_m,
                 one_minus_beta_m=0.0 if beta_m is None else 1.0 - beta_m, neg_remove=-remove_scale,
                 apply=apply_scale)
    sc_cache: dict = {}
    rest: List[int] = []
    for i, p in enumerate(params):
        g, z, v = grads[i], zs[i], vs[i]
        m = ms[i] if ms is not None else None
        if m is not None and not fold:  # m present but not folded (never in the optimizer): eager
            rest.append(i)
            continue
        if not _eligible(impl, (p, g, z, v, m), (z, v, m)):
            rest.append(i)
            continue
        seed = step_seed(step, i)
        flat = (p.view(-1), g.view(-1), z.view(-1), v.view(-1))
        sc = _scalars(p.device, sc_cache, **hyper)
        if m is not None:
            ok = _call(impl, "update_m", *flat, m.view(-1), sc, seed)
        else:
            ok = _call(impl, "update", *flat, sc, seed)
        if not ok:
            rest.append(i)
    if not rest:
        return
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, ckp1=ckp1,
              bias_correction2=bias_correction2, beta_m=beta_m, remove_scale=remove_scale, apply_scale=apply_scale,
              foreach=impl != "single")
    plain = [i for i in rest if not (_is_low(zs[i]) or _is_low(vs[i]) or (ms is not None and _is_low(ms[i])))]
    low = [i for i in rest if i not in set(plain)]
    if plain:
        F.sf_adamw_update_([params[i] for i in plain], [grads[i] for i in plain], [zs[i] for i in plain],
                           [vs[i] for i in plain], None if ms is None else [ms[i] for i in plain], **kw)
    for i in low:  # low-precision state, eager: compute in fp32 copies, write back stochastically rounded
        z32, v32 = zs[i].float(), vs[i].float()
        m32 = None if ms is None else ms[i].float()
        F.sf_adamw_update_([params[i]], [grads[i]], [z32], [v32], None if m32 is None else [m32], **kw)
        rz, rv, rm = _r16s(params[i].numel(), step_seed(step, i), params[i].device)
        for dst, src, r in ((zs[i], z32, rz), (vs[i], v32, rv)) + (((ms[i], m32, rm),) if m32 is not None else ()):
            dst.copy_(round_to(src.view(-1), dst.dtype, r).view_as(dst))


def fold_momentum_(ms: Sequence[Tensor], grads: Sequence[Tensor], beta_m: float, *, impl: str, step: int = 0) -> None:
    """:func:`functional.fold_momentum_` (two_pass's ``move_to_ascent``); bf16 momenta are folded
    in fp32 and stochastically rounded, like the update does."""
    ms, grads = list(ms), list(grads)
    plain = [i for i, m in enumerate(ms) if not _is_low(m)]
    if plain:
        F.fold_momentum_([ms[i] for i in plain], [grads[i] for i in plain], beta_m, foreach=impl != "single")
    for i, m in enumerate(ms):
        if _is_low(m):
            m32 = m.float()
            F.fold_momentum_([m32], [grads[i]], beta_m, foreach=False)
            _, _, rm = _r16s(m.numel(), step_seed(step, i, salt=1), m.device)
            m.copy_(round_to(m32.view(-1), m.dtype, rm).view_as(m))
