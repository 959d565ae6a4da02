"""Sharpness and flatness measures of a trained model.

    top_hessian_eigenvalue   power iteration on Hessian-vector products (local, DDP)
    hessian_vector_product   ∇²L·v by double backward (local, DDP)
    loss_landscape_1d/_2d    L along filter-normalized random directions (local, DDP, FSDP2)
    sam_sharpness            L(θ + ρ g/||g||) − L(θ) (local, DDP, FSDP2)
    filter_normalized_direction, random_direction
    evaluation_weights       context manager: measure a schedule-free model at x

Every function takes ``(model, loss_fn, batches)`` with
``loss_fn(module, batch) -> scalar mean loss`` and measures the mean of it over all
batches on all ranks, so a DDP or FSDP2 run gives the single-process number.
FSDP1 and 2-D (HSDP) meshes raise ``NotImplementedError``; so does the Hessian on
FSDP2 (gradients there are made by hooks outside the autograd graph).
"""

from .directions import filter_normalized_direction, random_direction
from .hessian import HessianEigenResult, hessian_vector_product, top_hessian_eigenvalue
from .landscape import Landscape1D, Landscape2D, loss_landscape_1d, loss_landscape_2d
from .sharpness import SharpnessResult, sam_sharpness
from .weights import evaluation_weights

__all__ = [
    "HessianEigenResult",
    "Landscape1D",
    "Landscape2D",
    "SharpnessResult",
    "evaluation_weights",
    "filter_normalized_direction",
    "hessian_vector_product",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "random_direction",
    "sam_sharpness",
    "top_hessian_eigenvalue",
]
