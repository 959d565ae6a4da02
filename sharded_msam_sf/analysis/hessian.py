"""The top Hessian eigenvalue of the loss, by power iteration on Hessian-vector
products.

    H = ∇²L(θ),   L(θ) = mean over all batches (on all ranks) of loss_fn(model, batch)

Hessian-vector products by double backward (Pearlmutter 1994):
Hv = ∇_θ (∇_θ L(θ) · v), exact, at the cost of about two backward passes per batch.
The forward runs with ``scaled_dot_product_attention`` forced to its math backend,
since the fused attention kernels have no double backward.

Power iteration: v_0 ~ N(0, I) (seeded, the same on every rank), v ← v / ||v||,
then repeat

    w = H v_k,   λ_k = v_k · w  (Rayleigh quotient),   v_{k+1} = w / ||w||

until |λ_k − λ_{k−1}| ≤ tol · |λ_k| or ``iters`` products. It converges to the
eigenvalue of largest *magnitude*, at the rate |λ_2 / λ_1| per iteration; at a
minimum (H ⪰ 0) that is the top eigenvalue, the usual sharpness measure. The
result carries the whole sequence λ_0, λ_1, … (``history``) and the residual
||Hv − λv|| so the convergence can be shown and judged.

Supported on one process and on DDP (each rank holds its own batches; the HVP is
all-reduced). Not on FSDP2: its gradients are produced by backward hooks outside
the autograd graph of the sharded parameters, so they cannot be differentiated
again — ``NotImplementedError`` says so; measure a full copy of the model instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from . import _layout
from ._layout import LossFn, measuring, resolve
from .directions import _random


@dataclass
class HessianEigenResult:
    """Result of :func:`top_hessian_eigenvalue`.

    eigenvalue: the last Rayleigh quotient λ (largest-magnitude eigenvalue estimate).
    history: λ after each Hessian-vector product.
    converged: whether the relative change fell to ``tol`` within ``iters``.
    iterations: the number of Hessian-vector products done.
    residual: ||H v − λ v|| / |λ| for the last v (0 for an exact eigenvector).
    """

    eigenvalue: float
    history: list = field(default_factory=list)
    converged: bool = False
    iterations: int = 0
    residual: float = math.nan


def hessian_vector_product(model: nn.Module, loss_fn: LossFn, batches: Sequence, vector: list,
                           *, eval_mode: bool = True) -> list:
    """∇²L(θ)·v for a parameter-shaped ``vector`` (a list of tensors shaped like the
    trainable parameters, in model order). Returns a list of the same shapes."""
    layout = resolve(model)
    batches = _layout.check_batches(batches)
    _check_vector(layout, vector)
    with measuring(layout, eval_mode):
        return _layout.hvp(layout, loss_fn, batches, list(vector))


def top_hessian_eigenvalue(model: nn.Module, loss_fn: LossFn, batches: Sequence, *,
                           iters: int = 50, tol: float = 1e-4, seed: int = 0,
                           eval_mode: bool = True, progress: bool = False) -> HessianEigenResult:
    """Largest-magnitude eigenvalue of the Hessian of the mean loss over ``batches``.

    Args:
        model: an ``nn.Module`` or a DDP-wrapped one (FSDP2: NotImplementedError).
        loss_fn: ``loss_fn(module, batch) -> scalar tensor`` (the batch's mean loss).
        batches: a sequence of batches (this rank's, under DDP); iterated once per
            Hessian-vector product.
        iters: maximum number of Hessian-vector products (default 50).
        tol: stop when |λ_k − λ_{k−1}| ≤ tol·|λ_k| (default 1e-4; 0 runs all iters).
        seed: seed of the random start vector (default 0).
        eval_mode: measure with ``model.eval()`` (default True); the flags are restored.
        progress: print λ_k per iteration to stderr (rank 0).

    The parameters are left untouched. For a schedule-free optimizer, call this at
    the evaluation weights x (``optimizer.eval()``, or :func:`evaluation_weights`).
    """
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    layout = resolve(model)
    batches = _layout.check_batches(batches)
    if layout.kind == "fsdp2":
        _layout.hvp(layout, loss_fn, batches, [])  # raises the explanatory error
    v = _random(layout, seed)
    _scale(v, 1.0 / _layout.norm(layout, v))
    result = HessianEigenResult(eigenvalue=math.nan)
    with measuring(layout, eval_mode):
        for k in range(iters):
            w = _layout.hvp(layout, loss_fn, batches, v)
            lam = _layout.dot(layout, v, w)
            w_norm = _layout.norm(layout, w)
            result.history.append(lam)
            result.iterations = k + 1
            result.eigenvalue = lam
            res_sq = max(w_norm ** 2 - lam ** 2, 0.0)  # ||w − λv||² with ||v|| = 1
            result.residual = math.sqrt(res_sq) / abs(lam) if lam != 0 else math.inf
            layout.log(f"[hessian] iter {k + 1:3d}  lambda = {lam:.6g}  residual = {result.residual:.2e}", progress)
            if w_norm == 0.0:  # H v = 0: v is in the null space; λ = 0 is exact
                result.converged = True
                result.residual = 0.0
                break
            if k > 0 and abs(lam - result.history[-2]) <= tol * abs(lam):
                result.converged = True
                break
            v = w
            _scale(v, 1.0 / w_norm)
    return result


def _scale(v: list, c: float) -> None:
    for t in v:
        t.mul_(c)


def _check_vector(layout, vector) -> None:
    if not isinstance(vector, (list, tuple)) or len(vector) != len(layout.params):
        raise ValueError(
            f"vector must be a list of {len(layout.params)} tensors shaped like the "
            f"trainable parameters, got {type(vector).__name__} of length "
            f"{len(vector) if hasattr(vector, '__len__') else '?'}"
        )
    for i, (v, p) in enumerate(zip(vector, layout.params)):
        if tuple(v.shape) != tuple(layout.local(p).shape):
            raise ValueError(
                f"vector[{i}] has shape {tuple(v.shape)}, expected {tuple(layout.local(p).shape)}"
            )
