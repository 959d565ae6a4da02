"""The loss along directions in parameter space (Li et al. 2018).

1-D:  f(α)    = L(θ + α·d)              for α in ``alphas``
2-D:  f(α, β) = L(θ + α·d + β·e)        on the grid ``alphas`` × ``betas``

with d, e filter-normalized random directions (see ``directions``; seeds ``seed``
and ``seed + 1``) unless given. L is the mean of ``loss_fn`` over all batches on
all ranks. Defaults: α, β in ``linspace(-1, 1, 21)``, biases/norm parameters not
perturbed (``bias_bn="zero"``).

Works on one process, DDP and FSDP2 (only forward passes; on FSDP2 the shards are
moved and the model is resharded before every forward). The parameters are
restored bit-exactly afterwards (copied back from a saved copy, which costs one
copy of the local parameters).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from . import _layout
from ._layout import Layout, LossFn, measuring, resolve
from .directions import _filter_normalized
from .hessian import _check_vector


@dataclass
class Landscape1D:
    """alphas: the step sizes; losses: L(θ + α·d) for each (Python floats)."""

    alphas: list
    losses: list


@dataclass
class Landscape2D:
    """losses[i][j] = L(θ + alphas[i]·d + betas[j]·e)."""

    alphas: list
    betas: list
    losses: list


def _grid(values, name):
    if values is None:
        return [float(a) for a in torch.linspace(-1.0, 1.0, 21)]
    try:
        vals = [float(a) for a in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from None
    if not vals:
        raise ValueError(f"{name} must not be empty")
    return vals


@contextlib.contextmanager
def _saved_params(layout: Layout):
    saved = [p.detach().clone() for p in layout.local_params()]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, s in zip(layout.local_params(), saved):
                p.copy_(s)
        layout.reshard()


def _set_params(layout: Layout, base: list, terms: list) -> None:
    """θ ← base + Σ c·d for (c, d) in terms."""
    with torch.no_grad():
        for i, p in enumerate(layout.local_params()):
            p.copy_(base[i])
            for c, d in terms:
                if c != 0.0:
                    p.add_(d[i], alpha=c)
    layout.reshard()


def loss_landscape_1d(model: nn.Module, loss_fn: LossFn, batches: Sequence, *, alphas=None,
                      direction: list | None = None, seed: int = 0, bias_bn: str = "zero",
                      eval_mode: bool = True, progress: bool = False) -> Landscape1D:
    """L(θ + α·d) for α in ``alphas`` along a filter-normalized random direction d
    (or the given ``direction``, a list of tensors shaped like the parameters)."""
    alphas = _grid(alphas, "alphas")
    layout = resolve(model)
    batches = _layout.check_batches(batches)
    d = _direction(layout, direction, seed, bias_bn)
    losses = []
    with measuring(layout, eval_mode), _saved_params(layout) as base:
        for k, a in enumerate(alphas):
            _set_params(layout, base, [(a, d)])
            losses.append(_layout.mean_loss(layout, loss_fn, batches))
            layout.log(f"[landscape-1d] {k + 1}/{len(alphas)} alpha={a:+.3f} loss={losses[-1]:.6g}", progress)
    return Landscape1D(alphas=alphas, losses=losses)


def loss_landscape_2d(model: nn.Module, loss_fn: LossFn, batches: Sequence, *, alphas=None,
                      betas=None, directions: tuple | None = None, seed: int = 0,
                      bias_bn: str = "zero", eval_mode: bool = True,
                      progress: bool = False) -> Landscape2D:
    """L(θ + α·d + β·e) on the grid ``alphas`` × ``betas``; d, e filter-normalized
    random directions with seeds ``seed`` and ``seed + 1`` (or ``directions=(d, e)``)."""
    alphas = _grid(alphas, "alphas")
    betas = _grid(betas, "betas")
    layout = resolve(model)
    batches = _layout.check_batches(batches)
    if directions is None:
        d = _direction(layout, None, seed, bias_bn)
        e = _direction(layout, None, seed + 1, bias_bn)
    else:
        if not isinstance(directions, (list, tuple)) or len(directions) != 2:
            raise ValueError("directions must be a pair (d, e) of parameter-shaped lists")
        d = _direction(layout, directions[0], seed, bias_bn)
        e = _direction(layout, directions[1], seed, bias_bn)
    losses = []
    n = len(alphas) * len(betas)
    with measuring(layout, eval_mode), _saved_params(layout) as base:
        for i, a in enumerate(alphas):
            row = []
            for b in betas:
                _set_params(layout, base, [(a, d), (b, e)])
                row.append(_layout.mean_loss(layout, loss_fn, batches))
            losses.append(row)
            layout.log(f"[landscape-2d] {(i + 1) * len(betas)}/{n} points", progress)
    return Landscape2D(alphas=alphas, betas=betas, losses=losses)


def _direction(layout: Layout, direction, seed: int, bias_bn: str) -> list:
    if direction is None:
        return _filter_normalized(layout, seed, bias_bn)
    _check_vector(layout, direction)
    return [t.detach().to(device=layout.local(p).device, dtype=p.dtype)
            for t, p in zip(direction, layout.params)]
