"""The eager implementations: single-tensor (``foreach=False``) and multi-tensor (``foreach=True``).

No ``torch.distributed`` here: every function sees only the tensors it is given
(a whole parameter, a DTensor's local shard or a flat ZeRO partition alike). The
state passed in must be in a compute dtype (fp32/fp64, :func:`.rules.require_compute_state`);
bf16 state reaches these functions as fp32 copies through :mod:`.bf16_state`.

Notation (``ALGORITHM.md``): the parameter tensor ``p`` holds ``y + s·m`` in train
mode (``s = 0`` when no ascent is applied), ``z`` is the base sequence, ``v`` the
second moment (``exp_avg_sq``) and ``m`` the MSAM momentum (``exp_avg``).
One step, with ``γ`` the scheduled lr, ``c`` the averaging weight and
``bc2 = 1 − β2^t``::

    y  = p − s_old·m                      remove the current ascent
    m ← β_m·m + (1 − β_m)·g               (only when ``beta_m`` is given: one_pass)
    v ← β2·v + (1 − β2)·g²
    u  = g / (sqrt(v / bc2) + eps) + λ·y
    y ← lerp(y, z, c) + γ·(β1·(1 − c) − 1)·u
    z ← z − γ·u
    p  = y + s_new·m                      apply the next ascent

Both paths give the same numbers. Low-precision params (bf16/fp16) are updated in
fp32 (their state's dtype) and written back rounded to nearest.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .rules import grad_compute_dtype, grad_flags, no_flags, require_compute_state

__all__ = ["ascent_stats", "grad_flags_of", "add_scaled_", "fold_momentum_", "sf_adamw_update_", "swap_y_x_"]

_INF = float("inf")


def _momentum_after(m: Tensor, g: Tensor, beta_m: float) -> Tensor:
    """``β_m·m + (1 − β_m)·g`` in m's dtype, with the exact ops that fold_momentum_ uses."""
    return m.mul(beta_m).add_(g.to(m.dtype), alpha=1.0 - beta_m)


def ascent_stats(ms: Sequence[Tensor], grads: Sequence[Tensor], *, beta_m: Optional[float],
                 foreach: bool) -> Tensor:
    """Local statistics of one param group: float64 ``[sumsq, nonfinite, v_overflow]``.

    ``sumsq`` is ``Σ ||m_new||²`` over the given tensors, where ``m_new`` is the
    momentum after folding ``grads`` in with decay ``beta_m`` (``beta_m=None``:
    the current ``m`` as it is, no folding). ``nonfinite`` and ``v_overflow`` are the
    gradient flags of :func:`.rules.grad_flags` over ``grads``. Nothing is written.
    ``ms`` may be empty (groups with ``rho == 0`` keep no momentum): then only the
    flags are computed.
    """
    device = grads[0].device if len(grads) else (ms[0].device if len(ms) else torch.device("cpu"))
    out = torch.zeros(3, dtype=torch.float64, device=device)
    if len(ms):
        if beta_m is None:
            news = list(ms)
        elif foreach:
            news = torch._foreach_mul(list(ms), beta_m)
            torch._foreach_add_(news, [g.to(m.dtype) for g, m in zip(grads, ms)], alpha=1.0 - beta_m)
        else:
            news = [_momentum_after(m, g, beta_m) for m, g in zip(ms, grads)]
        if foreach:
            norms = torch._foreach_norm(news, 2)
            out[0] = torch.stack([n.double() for n in norms]).square().sum() if norms else 0.0
        else:
            out[0] = sum((n.double().square().sum() for n in news), torch.zeros((), dtype=torch.float64, device=device))
    out[1:] = grad_flags_of(grads, foreach=foreach) if len(grads) else no_flags(device)
    return out


def grad_flags_of(grads: Sequence[Tensor], *, foreach: bool) -> Tensor:
    """:func:`.rules.grad_flags` of these gradients (max|g| per tensor, empty tensors skipped)."""
    gs = [g for g in grads if g.numel()]
    if not gs:
        return no_flags(grads[0].device)
    if foreach:
        amax = torch._foreach_norm(gs, _INF)
    else:
        amax = [torch.linalg.vector_norm(g, _INF) for g in gs]
    return grad_flags(torch.stack([a.to(grad_compute_dtype(g)) for a, g in zip(amax, gs)]))


def add_scaled_(params: Sequence[Tensor], ms: Sequence[Tensor], scale: float, *, foreach: bool) -> None:
    """``p ← p + scale·m`` for each pair (apply ``scale = s``, remove ``scale = −s``);
    computed in the wider of the two dtypes, p rounded to nearest."""
    if scale == 0.0 or not len(params):
        return
    if foreach and all(p.dtype == m.dtype for p, m in zip(params, ms)):
        torch._foreach_add_(list(params), list(ms), alpha=scale)
        return
    for p, m in zip(params, ms):
        if p.dtype == m.dtype or torch.promote_types(p.dtype, m.dtype) == p.dtype:  # (bf16 state: m narrower)
            p.add_(m, alpha=scale)
        else:
            p.copy_(p.to(m.dtype).add_(m, alpha=scale))


def fold_momentum_(ms: Sequence[Tensor], grads: Sequence[Tensor], beta_m: float, *, foreach: bool) -> None:
    """``m ← β_m·m + (1 − β_m)·g`` in place (same ops as :func:`ascent_stats`)."""
    if not len(ms):
        return
    require_compute_state(ms, "fold_momentum_")
    if foreach:
        torch._foreach_mul_(list(ms), beta_m)
        torch._foreach_add_(list(ms), [g.to(m.dtype) for g, m in zip(grads, ms)], alpha=1.0 - beta_m)
    else:
        for m, g in zip(ms, grads):
            m.mul_(beta_m).add_(g.to(m.dtype), alpha=1.0 - beta_m)


def swap_y_x_(params: Sequence[Tensor], zs: Sequence[Tensor], weight: float, *, foreach: bool) -> None:
    """``p ← lerp(p, z, weight)``: y→x with ``1 − 1/β1``, x→y with ``1 − β1`` (as schedulefree)."""
    if not len(params):
        return
    if foreach and all(p.dtype == z.dtype for p, z in zip(params, zs)):
        torch._foreach_lerp_(list(params), list(zs), weight)
        return
    for p, z in zip(params, zs):
        if p.dtype == z.dtype:
            p.lerp_(z, weight)
        elif torch.promote_types(p.dtype, z.dtype) == p.dtype:  # bf16 state, wider params
            p.lerp_(z.to(p.dtype), weight)
        else:
            p.copy_(p.to(z.dtype).lerp_(z, weight))


def sf_adamw_update_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    zs: Sequence[Tensor],
    vs: Sequence[Tensor],
    ms: Optional[Sequence[Tensor]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ckp1: float,
    bias_correction2: float,
    beta_m: Optional[float],
    remove_scale: float,
    apply_scale: float,
    foreach: bool,
) -> None:
    """One Schedule-Free AdamW step on the params that have gradients.

    ``params[i]`` holds ``y + remove_scale·ms[i]`` on entry and ``y_new +
    apply_scale·ms[i]`` on exit; ``ms`` is folded with ``grads`` first when
    ``beta_m`` is not None (one_pass). ``ms=None`` means no momentum (rho = 0):
    the scales must then be 0. Grads are not modified.
    """
    if not len(params):
        return
    if ms is None and (remove_scale != 0.0 or apply_scale != 0.0):
        raise ValueError("an ascent scale needs the momentum tensors")
    require_compute_state(list(zs) + list(vs) + (list(ms) if ms is not None else []), "sf_adamw_update_")
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, ckp1=ckp1,
              bias_correction2=bias_correction2, beta_m=beta_m, remove_scale=remove_scale, apply_scale=apply_scale)
    if foreach:
        _update_foreach(params, grads, zs, vs, ms, **kw)
    else:
        for i, p in enumerate(params):
            _update_single(p, grads[i], zs[i], vs[i], None if ms is None else ms[i], **kw)


def _update_single(p: Tensor, g: Tensor, z: Tensor, v: Tensor, m: Optional[Tensor], *, lr, beta1, beta2, eps,
                   weight_decay, ckp1, bias_correction2, beta_m, remove_scale, apply_scale) -> None:
    low = p.dtype != z.dtype
    y = p.to(z.dtype) if low else p  # y is the working copy (fp32 for low-precision params)
    g = g.to(z.dtype)
    if m is not None and remove_scale != 0.0:
        y.add_(m, alpha=-remove_scale)
    if m is not None and beta_m is not None:
        m.mul_(beta_m).add_(g, alpha=1.0 - beta_m)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    u = g / v.div(bias_correction2).sqrt_().add_(eps)
    if weight_decay != 0.0:
        u.add_(y, alpha=weight_decay)
    y.lerp_(z, ckp1)
    y.add_(u, alpha=lr * (beta1 * (1.0 - ckp1) - 1.0))
    z.sub_(u, alpha=lr)
    if m is not None and apply_scale != 0.0:
        y.add_(m, alpha=apply_scale)
    if low:
        p.copy_(y)


def _update_foreach(params, grads, zs, vs, ms, *, lr, beta1, beta2, eps, weight_decay, ckp1,
                    bias_correction2, beta_m, remove_scale, apply_scale) -> None:
    params = list(params)
    zs, vs = list(zs), list(vs)
    low = [p.dtype != z.dtype for p, z in zip(params, zs)]
    ys: List[Tensor] = [p.to(z.dtype) if lo else p for p, z, lo in zip(params, zs, low)]
    gs = [g.to(z.dtype) for g, z in zip(grads, zs)]
    if ms is not None:
        ms = list(ms)
        if remove_scale != 0.0:
            torch._foreach_add_(ys, ms, alpha=-remove_scale)
        if beta_m is not None:
            torch._foreach_mul_(ms, beta_m)
            torch._foreach_add_(ms, gs, alpha=1.0 - beta_m)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
    denom = torch._foreach_div(vs, bias_correction2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    u = torch._foreach_div(gs, denom)
    del denom
    if weight_decay != 0.0:
        torch._foreach_add_(u, ys, alpha=weight_decay)
    torch._foreach_lerp_(ys, zs, ckp1)
    torch._foreach_add_(ys, u, alpha=lr * (beta1 * (1.0 - ckp1) - 1.0))
    torch._foreach_sub_(zs, u, alpha=lr)
    if ms is not None and apply_scale != 0.0:
        torch._foreach_add_(ys, ms, alpha=apply_scale)
    for p, y, lo in zip(params, ys, low):
        if lo:
            p.copy_(y)
