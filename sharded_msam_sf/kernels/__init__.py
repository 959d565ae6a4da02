"""The math of AdamW-MSAM-ScheduleFree over lists of local tensors: one dispatch surface.

The optimizer calls only the functions below (as torch.optim's ``adam()`` dispatches to
``_single_tensor_adam``, ``_multi_tensor_adam`` and ``_fused_adam``); each takes
``impl``, one of :data:`IMPLS`:

- ``"single"``: one tensor at a time (:mod:`.eager`, ``foreach=False``);
- ``"foreach"``: ``torch._foreach_*`` multi-tensor kernels (:mod:`.eager`);
- ``"fused"``: every contiguous CPU/CUDA tensor through the compiled kernels
  (:mod:`.compiled`; on CUDA with fp32 state the hand-written :mod:`.triton` ones); a
  ``RuntimeError`` says why if they cannot run;
- ``"auto"`` (the optimizer's default): fp32 CPU tensors through one multi-tensor C++ call
  per pass (:mod:`.multi_tensor`: all of a group's tensors in one OpenMP loop, at the byte
  floor) when together they hold at least :data:`AUTO_MIN_NUMEL` elements or number at
  least :data:`MULTI_MIN_TENSORS`; the compiled kernels for the other tensors of at least
  :data:`AUTO_MIN_NUMEL` elements (CUDA, and every tensor with bf16 state); foreach for the
  rest. Where compilation is unavailable or fails, one warning and foreach from then on,
  for that optimizer (its :class:`FusedState`) and device type only. The stats and the
  update take the multi-tensor kernel; fold and shift (two_pass) keep the compiled ones.

Operations (``ALGORITHM.md``; ``s`` the ascent scale, ``γ`` the scheduled lr, ``c`` the
averaging weight, ``bc2 = 1 − β2^t``):

=====================  ==========================================================================
:func:`ascent_stats`   ``[Σ||β_m·m + (1 − β_m)·g||², nonfinite, v_overflow]`` (float64), nothing written
:func:`fold_momentum_` ``m ← β_m·m + (1 − β_m)·g`` (two_pass's ``move_to_ascent()``)
:func:`sf_adamw_update_` ``y = p − s_old·m``; fold m (one_pass); ``v ← β2·v + (1 − β2)·g²``;
                       ``u = g/(sqrt(v/bc2) + eps) + λ·y``; ``y ← lerp(y, z, c) + γ·(β1·(1 − c) − 1)·u``;
                       ``z ← z − γ·u``; ``p = y + s_new·m``
:func:`add_scaled_`    ``p ← p + scale·m`` (apply or remove an ascent)
:func:`swap_y_x_`      ``p ← lerp(p, z, w)``: y→x with ``w = 1 − 1/β1``, x→y with ``w = 1 − β1``
=====================  ==========================================================================

``swap_y_x_`` is one elementwise op: ``fused`` and ``auto`` use the multi-tensor kernel
for it, which already reads each input once. ``fold_momentum_`` and ``add_scaled_``
(two_pass's ``move_to_ascent()``/``move_from_ascent()``) take the compiled kernels like
the update: foreach folds in two passes, and neither foreach op handles bf16 m.
Every path gives the same trajectory (``tests/test_fused.py``); they differ only in
floating-point rounding. bf16 state (stochastic rounding) is handled by
:mod:`.bf16_state` on every path, with the same random bits.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import bf16_state, compiled, eager, multi_tensor
from .abstract import is_abstract
from .compiled import FusedState
from .rules import grad_flags, is_low
from .scalars import Slot, pack, step_scalars

__all__ = [
    "IMPLS", "AUTO_MIN_NUMEL", "FusedState", "compile_available", "compile_counters", "ascent_stats",
    "fold_momentum_", "sf_adamw_update_", "add_scaled_", "swap_y_x_", "ascent_scale",
]

IMPLS = ("auto", "fused", "foreach", "single")
AUTO_MIN_NUMEL = int(os.environ.get("SHARDED_MSAM_SF_FUSED_MIN_NUMEL", 1 << 18))
# auto: at least this many small fp32 CPU tensors of a group go through one multi-tensor call
MULTI_MIN_TENSORS = int(os.environ.get("SHARDED_MSAM_SF_MULTI_MIN_TENSORS", 64))
# auto: whether fp32 CPU tensors may take the multi-tensor C++ kernel at all (0: the compiled kernels)
MULTI_TENSOR = os.environ.get("SHARDED_MSAM_SF_MULTI_TENSOR", "1") != "0"
_DEFAULT_STATE = FusedState()   # for callers outside an optimizer (tests, benchmarks)


def compile_available(device="cpu") -> bool:
    """Whether the compiled kernels can run on ``device`` (no compilation is attempted)."""
    return compiled.available(device)


def compile_counters() -> dict:
    """How many compiled-kernel calls were made in this process (``calls``, ``triton_calls``)."""
    return compiled.counters()


def ascent_scale(rho: float, sign: float, norm: float) -> float:
    """``s = sign·ρ / ||m||``, and 0 when ``||m|| == 0`` or ``ρ == 0`` (no perturbation)."""
    if rho == 0.0 or not norm > 0.0:
        return 0.0
    return sign * rho / norm


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"Invalid impl: {impl!r} (valid: {', '.join(IMPLS)})")


def _foreach(impl: str) -> bool:
    return impl != "single"


def _eligible(impl: str, state: FusedState, tensors: Sequence[Optional[Tensor]],
              state_tensors: Sequence[Optional[Tensor]] = ()) -> bool:
    """Whether this (p, g, z, v[, m]) tuple goes through a compiled kernel."""
    if impl not in ("fused", "auto"):
        return False
    p = tensors[0]
    n = p.numel()
    # small tensors do not pay back a compiled call's overhead, except with bf16 state,
    # whose eager path (fp32 copies, rounding in separate ops) is slower still
    small_ok = any(is_low(t) for t in state_tensors)
    if n < 2 or (impl == "auto" and n < AUTO_MIN_NUMEL and not small_ok):
        return False  # (torch.compile specialises sizes 0 and 1: they would cost a compile each)
    if any(t is not None and (not t.is_contiguous() or t.numel() != n or t.device != p.device
                              or t.layout != torch.strided) for t in tensors):
        return False  # non-contiguous or odd layouts go eager, even when fused is asked
    if any(is_abstract(t) for t in tensors if t is not None):
        return False  # meta / FakeTensorMode tensors (a dry run): eager, which needs no data
    reason = compiled.unavailable_reason(p.device, state)
    if reason is None:
        return True
    if impl == "fused":
        raise RuntimeError(f"AdamWMSAMScheduleFree(fused=True): the fused step is unavailable ({reason}); "
                           "use fused=None (falls back to foreach) or foreach=True")
    if os.environ.get("SHARDED_MSAM_SF_FUSED", "1") != "0" and p.device.type in ("cpu", "cuda"):
        compiled.warn_fallback(state, p.device, reason)
    return False


def _multi(impl: str, state: FusedState, idx: Sequence[int], tensors_of) -> List[int]:
    """The indices that go through one multi-tensor call (:mod:`.multi_tensor`): ``auto`` only,
    fp32 CPU tensors, together at least :data:`AUTO_MIN_NUMEL` elements or at least
    :data:`MULTI_MIN_TENSORS` of them, the extension built (a failed build: one warning, then
    the compiled kernels for the large tensors and foreach for the rest)."""
    if impl != "auto" or not MULTI_TENSOR or not len(idx):
        return []
    sel = [i for i in idx if multi_tensor.eligible(*tensors_of(i))]
    if not sel or (len(sel) < MULTI_MIN_TENSORS and sum(tensors_of(i)[0].numel() for i in sel) < AUTO_MIN_NUMEL):
        return []
    if compiled.unavailable_reason(torch.device("cpu"), state) is not None:
        return []
    if multi_tensor.load() is None:
        state.warn_once("multi_tensor", "AdamWMSAMScheduleFree: the multi-tensor CPU kernel failed to build "
                        f"({multi_tensor.build_error()}); fp32 CPU tensors use the compiled kernels "
                        "(large) and foreach (small)")
        return []
    return sel


def ascent_stats(ms: Sequence[Tensor], grads: Sequence[Tensor], *, beta_m: Optional[float], impl: str,
                 state: Optional[FusedState] = None) -> Tensor:
    """Local statistics of one param group: float64 ``[sumsq, nonfinite, v_overflow]``.

    ``sumsq = Σ ||m_new||²`` with ``m_new = β_m·m + (1 − β_m)·g`` (``beta_m=None``: the
    current ``m``, no folding; ``ms`` empty: 0); the flags are :func:`.rules.grad_flags`
    of ``grads``. Nothing is written."""
    _check_impl(impl)
    state = _DEFAULT_STATE if state is None else state
    ms, grads = list(ms), list(grads)
    device = grads[0].device if grads else (ms[0].device if ms else torch.device("cpu"))
    rest_m, rest_g = [], []
    parts: List[Tensor] = []
    foldable = beta_m is not None or not ms
    sel = _multi(impl, state, range(len(grads)), lambda i: (grads[i], ms[i] if ms else None)) if foldable else []
    if sel:
        chosen = set(sel)
        out = multi_tensor.stats([ms[i] for i in sel] if ms else [], [grads[i] for i in sel], beta_m)
        parts.append(torch.cat([out[:1], grad_flags(out[1].to(torch.float32))]))
        grads = [t for i, t in enumerate(grads) if i not in chosen]
        ms = [t for i, t in enumerate(ms) if i not in chosen] if ms else ms
    if impl in ("fused", "auto") and foldable:
        sc = None
        for i, g in enumerate(grads):
            m = ms[i] if ms else None
            out = None
            if _eligible(impl, state, (g, m), (m,)):
                if m is not None:
                    if sc is None:
                        sc = pack(g.device, **step_scalars(lr=0.0, beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0,
                                                           ckp1=0.0, bias_correction2=0.0, beta_m=beta_m,
                                                           remove_scale=0.0, apply_scale=0.0))
                    out = compiled.call(state, impl, "stats", m.view(-1), g.view(-1), sc)
                else:
                    out = compiled.call(state, impl, "flag", g.view(-1))
            if out is not None:
                parts.append(out)
                continue
            if m is not None:
                rest_m.append(m)
            rest_g.append(g)
    else:
        rest_m, rest_g = ms, grads
    if rest_m or rest_g or not parts:
        parts.append(eager.ascent_stats(bf16_state.fp32_view(rest_m), rest_g, beta_m=beta_m,
                                        foreach=_foreach(impl)).to(device))
    if len(parts) == 1:
        return parts[0]
    stacked = torch.stack(parts)
    return torch.cat([stacked[:, :1].sum(0), stacked[:, 1:].amax(0)])


def sf_adamw_update_(
    params: Sequence[Tensor], grads: Sequence[Tensor], zs: Sequence[Tensor], vs: Sequence[Tensor],
    ms: Optional[Sequence[Tensor]], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    ckp1: float, bias_correction2: float, beta_m: Optional[float], remove_scale: float, apply_scale: float,
    impl: str, step: int = 0, state: Optional[FusedState] = None,
) -> None:
    """One Schedule-Free AdamW step on the params that have gradients (the table above).

    ``params[i]`` holds ``y + remove_scale·ms[i]`` on entry and ``y_new + apply_scale·ms[i]``
    on exit; ``ms`` is folded first when ``beta_m`` is not None (one_pass); ``ms=None``: no
    momentum (rho = 0), the scales must be 0. bf16 state is stochastically rounded with
    seeds from ``step`` and the tensor's position, alike on every path."""
    _check_impl(impl)
    if not len(params):
        return
    if ms is None and (remove_scale != 0.0 or apply_scale != 0.0):
        raise ValueError("an ascent scale needs the momentum tensors")
    state = _DEFAULT_STATE if state is None else state
    fold = ms is not None and beta_m is not None
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, ckp1=ckp1,
                 bias_correction2=bias_correction2, beta_m=beta_m, remove_scale=remove_scale, apply_scale=apply_scale)
    sc = None
    rest: List[int] = []
    sel = _multi(impl, state, range(len(params)),
                 lambda i: (params[i], grads[i], zs[i], vs[i], None if ms is None else ms[i])) \
        if (ms is None or fold) else []
    if sel:
        sc_list = [v for _, v in sorted((int(getattr(Slot, k.upper())), v) for k, v in step_scalars(**hyper).items())]
        multi_tensor.update_([params[i] for i in sel], [grads[i] for i in sel], [zs[i] for i in sel],
                             [vs[i] for i in sel], None if ms is None else [ms[i] for i in sel], sc_list)
    chosen = set(sel)
    for i, p in enumerate(params):
        if i in chosen:
            continue
        g, z, v = grads[i], zs[i], vs[i]
        m = ms[i] if ms is not None else None
        # (m given but not folded never happens in the optimizer: eager)
        if (m is not None and not fold) or not _eligible(impl, state, (p, g, z, v, m), (z, v, m)):
            rest.append(i)
            continue
        if sc is None:
            sc = pack(p.device, **step_scalars(**hyper))
        flat = (p.view(-1), g.view(-1), z.view(-1), v.view(-1))
        seed = bf16_state.step_seed(step, i)
        if m is not None:
            ok = compiled.call(state, impl, "update_m", *flat, m.view(-1), sc, seed)
        else:
            ok = compiled.call(state, impl, "update", *flat, sc, seed)
        if ok is None:   # did not run (compile failure, auto): nothing was written
            rest.append(i)
    if not rest:
        return
    fe = _foreach(impl)
    low = {i for i in rest if is_low(zs[i]) or is_low(vs[i]) or (ms is not None and is_low(ms[i]))}
    plain = [i for i in rest if i not in low]
    if plain:
        eager.sf_adamw_update_([params[i] for i in plain], [grads[i] for i in plain], [zs[i] for i in plain],
                               [vs[i] for i in plain], None if ms is None else [ms[i] for i in plain],
                               foreach=fe, **hyper)
    for i in sorted(low):
        bf16_state.update_(eager.sf_adamw_update_, params[i], grads[i], zs[i], vs[i],
                           None if ms is None else ms[i], index=i, step=step, foreach=fe, **hyper)


def fold_momentum_(ms: Sequence[Tensor], grads: Sequence[Tensor], beta_m: float, *, impl: str,
                   step: int = 0, state: Optional[FusedState] = None) -> None:
    """``m ← β_m·m + (1 − β_m)·g`` in place (two_pass's ``move_to_ascent()``), the same ops
    as :func:`ascent_stats`; bf16 momenta folded in fp32 and stochastically rounded (the
    fold's random bits, :data:`.bf16_state.SALT_FOLD`). ``fused``/``auto``: one compiled pass
    per eligible tensor (reads m and g once, writes m once)."""
    _check_impl(impl)
    state = _DEFAULT_STATE if state is None else state
    ms, grads = list(ms), list(grads)
    sc, rest = None, []
    for i, (m, g) in enumerate(zip(ms, grads)):
        if _eligible(impl, state, (m, g), (m,)):
            if sc is None:
                sc = pack(m.device, **step_scalars(lr=0.0, beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0,
                                                   ckp1=0.0, bias_correction2=0.0, beta_m=beta_m,
                                                   remove_scale=0.0, apply_scale=0.0))
            seed = bf16_state.step_seed(step, i, salt=bf16_state.SALT_FOLD)
            if compiled.call(state, impl, "fold", m.view(-1), g.view(-1), sc, seed) is not None:
                continue
        rest.append(i)
    plain = [i for i in rest if not is_low(ms[i])]
    if plain:
        eager.fold_momentum_([ms[i] for i in plain], [grads[i] for i in plain], beta_m, foreach=_foreach(impl))
    for i in rest:
        if is_low(ms[i]):
            bf16_state.fold_(eager.fold_momentum_, ms[i], grads[i], beta_m, index=i, step=step, foreach=False)


def add_scaled_(params: Sequence[Tensor], ms: Sequence[Tensor], scale: float, *, impl: str,
                state: Optional[FusedState] = None) -> None:
    """``p ← p + scale·m`` (apply ``scale = s``, remove ``scale = −s``); p rounded to nearest.
    ``fused``/``auto``: one compiled pass per eligible tensor, the rest on foreach."""
    _check_impl(impl)
    if scale == 0.0 or not len(params):
        return
    state = _DEFAULT_STATE if state is None else state
    sc, rest_p, rest_m = None, [], []
    for p, m in zip(params, ms):
        if _eligible(impl, state, (p, m), (m,)):
            if sc is None:
                sc = pack(p.device, **step_scalars(lr=0.0, beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0,
                                                   ckp1=0.0, bias_correction2=0.0, beta_m=None,
                                                   remove_scale=0.0, apply_scale=scale))
            if compiled.call(state, impl, "shift", p.view(-1), m.view(-1), sc) is not None:
                continue
        rest_p.append(p)
        rest_m.append(m)
    eager.add_scaled_(rest_p, rest_m, scale, foreach=_foreach(impl))


def swap_y_x_(params: Sequence[Tensor], zs: Sequence[Tensor], weight: float, *, impl: str) -> None:
    """``p ← lerp(p, z, weight)``: y→x with ``1 − 1/β1``, x→y with ``1 − β1`` (as schedulefree)."""
    _check_impl(impl)
    eager.swap_y_x_(params, zs, weight, foreach=_foreach(impl))
