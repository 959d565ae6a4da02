"""SAM sharpness: how much the loss rises at radius ρ along the normalized gradient.

    S_ρ(θ) = L(θ + ρ · g / ||g||) − L(θ),     g = ∇L(θ)

the first-order solution of SAM's inner maximization max_{||ε|| ≤ ρ} L(θ + ε)
(Foret et al. 2021), with L the mean of ``loss_fn`` over all batches on all ranks
and ||·|| the global L2 norm over every trainable parameter. Default ρ = 0.05
(SAM's default). For a quadratic L = ½ θᵀAθ − bᵀθ it is exactly
ρ·||g|| + ½ ρ² · gᵀAg / ||g||².

Works on one process, DDP and FSDP2 (one backward pass for g, forward passes for
the losses; on FSDP2 the norm is the all-reduced sum over the shards). The
parameters and their ``.grad`` are restored afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from . import _layout
from ._layout import LossFn, measuring, resolve
from .landscape import _saved_params, _set_params


@dataclass
class SharpnessResult:
    """sharpness = perturbed_loss − loss; grad_norm = ||∇L(θ)||; rho = ρ."""

    sharpness: float
    loss: float
    perturbed_loss: float
    grad_norm: float
    rho: float


def sam_sharpness(model: nn.Module, loss_fn: LossFn, batches: Sequence, *, rho: float = 0.05,
                  eval_mode: bool = True, progress: bool = False) -> SharpnessResult:
    """S_ρ(θ) = L(θ + ρ·g/||g||) − L(θ) (see the module docstring).

    If g = 0 the perturbation is zero and the sharpness is 0.
    """
    if not (isinstance(rho, (int, float)) and not isinstance(rho, bool) and rho >= 0 and math.isfinite(rho)):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    layout = resolve(model)
    batches = _layout.check_batches(batches)
    with measuring(layout, eval_mode):
        loss, g = _layout.mean_grad(layout, loss_fn, batches)
        g_norm = _layout.norm(layout, g)
        layout.log(f"[sharpness] loss={loss:.6g} |g|={g_norm:.4g}", progress)
        if g_norm == 0.0 or rho == 0:
            return SharpnessResult(0.0, loss, loss, g_norm, float(rho))
        with _saved_params(layout) as base:
            _set_params(layout, base, [(rho / g_norm, g)])
            perturbed = _layout.mean_loss(layout, loss_fn, batches)
        layout.log(f"[sharpness] perturbed loss={perturbed:.6g}", progress)
    return SharpnessResult(perturbed - loss, loss, perturbed, g_norm, float(rho))
