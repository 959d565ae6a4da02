"""two_pass (SAM) with gradient accumulation, for a loop of your own (DDP, FSDP1, FSDP2, one process).

A step of n micro-batches B_1..B_n (ALGORITHM.md, "With gradient accumulation in two_pass")::

    g0 = (1/n) Σ_i ∇f_{B_i}(y)        first pass, at y: every micro-batch's backward, grads accumulated
    move_to_ascent()                  folds g0 into m, UNCLIPPED, clears the grads, moves to ỹ = y + ρ·m/‖m‖
    g  = (1/n) Σ_i ∇f_{B_i}(ỹ)        second pass: the SAME micro-batches at ỹ
    move_from_ascent()                back to y
    clip g (if you clip)              clipping applies to the gradient the update uses, never to g0
    step()                            update with g

Under DDP / FSDP only the last micro-batch of each pass synchronises its gradients (``no_sync()``, or
FSDP2's ``set_requires_gradient_sync(False)``, for the others), so a step costs 2 gradient reductions
and the optimizer's 2 stats all-reduces (one in ``move_to_ascent()``, one in ``step()``) — the same
as two_pass without accumulation. The recipe by hand::

    opt.zero_grad(set_to_none=True)
    for i, b in enumerate(micro):                      # first pass at y
        with no_sync(model, i < len(micro) - 1):
            (loss_fn(b) / len(micro)).backward()
    opt.move_to_ascent()
    for i, b in enumerate(micro):                      # second pass at the ascent point
        with no_sync(model, i < len(micro) - 1):
            (loss_fn(b) / len(micro)).backward()
    opt.move_from_ascent()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)   # optional: clips g only
    opt.step()
    opt.zero_grad(set_to_none=True)

:func:`two_pass_step` runs exactly this. Keep each micro-batch's randomness (dropout) as you want it:
the second pass draws new masks unless you re-seed. Frameworks: ``MSAMTrainer`` (HF) and the Lightning
callback run it for their own accumulation; the main job for ``train.grad_accum > 1``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

__all__ = ["no_sync", "two_pass_step"]


@contextlib.contextmanager
def no_sync(model: Optional[torch.nn.Module], skip: bool = True) -> Iterator[None]:
    """Hold back ``model``'s gradient synchronisation inside the block when ``skip`` (a micro-batch that is
    not the last of its pass): DDP and FSDP1 through ``model.no_sync()``, FSDP2 through
    ``set_requires_gradient_sync(False)`` (set back to True after). A plain module (or ``None``, or
    ``skip=False``): nothing."""
    if not skip or model is None:
        yield
        return
    if callable(getattr(model, "set_requires_gradient_sync", None)):  # FSDP2 fully_shard
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    if callable(getattr(model, "no_sync", None)):  # DDP, FSDP1
        with model.no_sync():
            yield
        return
    yield


def _ascent(optimizer: Any) -> bool:
    return any(float(g.get("rho") or 0.0) > 0.0 for g in optimizer.param_groups)


def two_pass_step(optimizer: Any, micro_batches: Sequence[Any], loss_fn: Callable[[Any], torch.Tensor], *,
                  model: Optional[torch.nn.Module] = None,
                  clip: Optional[Callable[[], Any]] = None) -> torch.Tensor:
    """One two_pass step of :class:`~sharded_msam_sf.AdamWMSAMScheduleFree` over ``micro_batches`` (the
    module docstring's loop): ``loss_fn(b)`` runs the forward of micro-batch ``b`` and returns its mean loss;
    each is divided by ``len(micro_batches)`` before its backward, so both passes take the mean over the
    micro-batches. ``model``: the DDP / FSDP1 / FSDP2 wrapper whose gradient sync is held back for all but
    the last micro-batch of each pass (None: no wrapper). ``clip``: called after the second pass, before
    ``step()`` (e.g. ``lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)``); g0 is never
    clipped. Groups that all have ``rho == 0`` take no second pass (the update uses g0, clipped).
    Returns the mean first-pass loss (detached). The gradients are cleared at the start and at the end."""
    if getattr(optimizer, "sam_mode", None) != "two_pass":
        raise ValueError(f"two_pass_step() needs an optimizer with sam_mode='two_pass', got "
                         f"{getattr(optimizer, 'sam_mode', type(optimizer).__name__)!r}: with one_pass accumulate "
                         "the micro-batches' gradients and call step() once")
    micro = list(micro_batches)
    if not micro:
        raise ValueError("two_pass_step() needs at least one micro-batch")
    n = len(micro)

    def run_pass() -> torch.Tensor:
        total = None
        for i, b in enumerate(micro):
            with no_sync(model, i < n - 1):
                loss = loss_fn(b)
                (loss / n).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total / n

    optimizer.zero_grad(set_to_none=True)
    loss = run_pass()
    if _ascent(optimizer):
        optimizer.move_to_ascent()
        run_pass()
        optimizer.move_from_ascent()
    if clip is not None:
        clip()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss
