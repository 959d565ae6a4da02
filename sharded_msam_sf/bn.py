"""BatchNorm running statistics at x: :func:`recalibrate`.

A schedule-free optimizer evaluates the average x, but BatchNorm's running mean and variance were
collected during training, at y (one_pass: at the ascent point ``y + s·m``). The usual fix
(schedule_free's README, MSAM's extra epoch, detectron2's PreciseBN) re-estimates them at x on a few
training batches. :func:`recalibrate` does it exactly and across data-parallel ranks:

1. the optimizer is switched to eval mode (params = x) if it is not there already;
2. every ``torch.nn.modules.batchnorm._BatchNorm`` with ``track_running_stats=True`` (BatchNorm1d/2d/3d,
   SyncBatchNorm, the lazy ones) is hooked; the whole model runs ``num_batches`` forward passes in
   train mode under ``torch.no_grad()`` (so each BatchNorm normalises with its batch's statistics, as in
   training). Each hook reads the module's input and accumulates, per channel and in float64, the
   count ``n``, the mean and ``M2 = Σ (x − mean)²`` (Chan et al.'s pairwise combination, batch by batch);
3. the per-rank ``(n, mean, M2)`` are combined over ``process_group`` the way SyncBatchNorm combines a
   batch: ``mean = Σ nᵢ·meanᵢ / n``, ``M2 = Σ M2ᵢ + Σ nᵢ·(meanᵢ − mean)²`` (two all-reduces of one packed
   float64 tensor each, for all modules together), never an average of per-rank variances;
4. each module gets ``running_mean = mean`` and ``running_var = M2 / (n − 1)`` (unbiased, as BatchNorm
   stores it), i.e. the statistics of one batch made of every sample seen on every rank: what a
   cumulative average (``momentum=None``) over equal batches converges to for the mean, and the exact
   pooled variance (a cumulative average of batch variances would miss the spread of the batch means).
   ``num_batches_tracked`` = the number of batches combined, summed over the ranks, so every rank holds
   the same buffers;
5. every module's ``training`` flag, and the optimizer's mode, are put back as they were; torch's random
   number generators (CPU and the model's accelerator, and a DataLoader's / its sampler's own Generator)
   are restored, so dropout in the passes and a re-iterated shuffled loader do not change the rest of the
   run.

Modules without running statistics (LayerNorm, GroupNorm, BatchNorm with ``track_running_stats=False``)
are not touched. InstanceNorm with ``track_running_stats=True`` keeps an average of per-instance
statistics, another quantity: it is refused with a clear error rather than left at y.

Misuse is made hard: ``optimizer`` must be passed, either the optimizer (the usual call, it is switched
to x for the passes and back afterwards) or ``None`` to state that the model already holds the point to
calibrate at (after ``optimizer.eval()``, or a model without a schedule-free optimizer). An optimizer
given in eval mode is left in eval mode; one given in train mode is put back in train mode (in one_pass
that re-applies the ascent), so call ``recalibrate`` right before ``optimizer.eval()``-and-evaluate, or
after ``eval()``, as you like.

All ranks of ``process_group`` must call it together (it all-reduces, and a DDP/FSDP/SyncBatchNorm
forward is itself collective: give every rank the same number of batches).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["recalibrate", "running_stat_modules", "default_forward"]

_REQUIRED: Any = object()


def running_stat_modules(model: nn.Module) -> List[_BatchNorm]:
    """The BatchNorm modules of ``model`` that keep running statistics (what :func:`recalibrate` resets)."""
    bad = [name for name, m in model.named_modules()
           if isinstance(m, _InstanceNorm) and m.track_running_stats]
    if bad:
        raise ValueError(f"recalibrate: {bad} are InstanceNorm layers with track_running_stats=True: their running "
                         "statistics average per-instance statistics, which recalibrate does not estimate; use "
                         "track_running_stats=False (the default for InstanceNorm) or recalibrate them yourself")
    return [m for m in model.modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]


def _device(model: nn.Module) -> Optional[torch.device]:
    for t in list(model.parameters()) + list(model.buffers()):
        local = getattr(t, "_local_tensor", t)  # an FSDP2 DTensor: the device of its shard
        return local.device
    return None


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` for a Tensor, ``model(batch[0])`` for an (inputs, targets, ...) tuple or list,
    ``model(**batch)`` for a dict (Hugging Face style); Tensors are moved to the model's device."""
    device = _device(model)

    def to(x: Any) -> Any:
        return x.to(device) if isinstance(x, Tensor) and device is not None else x

    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return model(**{k: to(v) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return model(to(batch[0]))
    return model(to(batch))


class _Moments:
    """Per-channel count, mean and M2 of one module's inputs, accumulated in float64 (Chan et al.)."""

    def __init__(self, module: _BatchNorm):
        self.module = module
        self.n = 0.0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None
        self.batches = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        x = getattr(x, "_local_tensor", x)
        dims = [d for d in range(x.dim()) if d != 1]
        xd = x.to(torch.float64)
        nb = float(x.numel() // x.shape[1]) if x.dim() > 1 else 0.0
        if nb == 0:
            return
        mb = xd.mean(dim=dims)
        m2b = ((xd - mb.view([1, -1] + [1] * (x.dim() - 2))) ** 2).sum(dim=dims)
        self.batches += 1
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta * delta * (self.n * nb / n)
        self.n = n


def _combine(moments: List[_Moments], group: Any, device: torch.device) -> None:
    """Combine every module's (n, mean, M2) over ``group`` and write the running statistics."""
    sizes = [m.module.num_features for m in moments]
    means = [m.mean if m.mean is not None else torch.zeros(c, dtype=torch.float64) for m, c in zip(moments, sizes)]
    m2s = [m.m2 if m.m2 is not None else torch.zeros(c, dtype=torch.float64) for m, c in zip(moments, sizes)]
    ns = torch.tensor([m.n for m in moments], dtype=torch.float64)
    batches = torch.tensor([float(m.batches) for m in moments], dtype=torch.float64)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    # first reduction: counts, batches and n·mean (the global mean); second: M2 + n·(mean − global mean)²
    first = torch.cat([ns, batches] + [n * mu.cpu() for n, mu in zip(ns, means)]).to(device)
    if distributed:
        dist.all_reduce(first, group=group)
    first = first.cpu()
    k = len(moments)
    n_all, batches_all = first[:k], first[k:2 * k]
    sums = torch.split(first[2 * k:], sizes)
    g_means = [s / n if n > 0 else s for s, n in zip(sums, n_all)]
    second = torch.cat([m2.cpu() + n * (mu.cpu() - gm) ** 2 for m2, n, mu, gm in zip(m2s, ns, means, g_means)])
    second = second.to(device)
    if distributed:
        dist.all_reduce(second, group=group)
    g_m2 = torch.split(second.cpu(), sizes)
    empty = [type(m.module).__name__ for m, n in zip(moments, n_all) if n < 2]
    if empty:
        raise RuntimeError(f"recalibrate: {len(empty)} BatchNorm modules ({empty[:3]}...) saw fewer than 2 values per "
                           "channel in the passes: the model's forward does not reach them, or num_batches is 0")
    for m, n, mean, m2, nbt in zip(moments, n_all, g_means, g_m2, batches_all):
        mod = m.module
        mod.running_mean.copy_(mean.to(mod.running_mean.dtype))
        mod.running_var.copy_((m2 / (n - 1)).to(mod.running_var.dtype))
        if mod.num_batches_tracked is not None:
            mod.num_batches_tracked.fill_(int(nbt))


def _generators(batches: Any) -> List[torch.Generator]:
    """The torch Generators a DataLoader's shuffling draws from (its own, its sampler's, its batch
    sampler's sampler's): iterating it again would advance them, and so change the next epoch's order."""
    found: List[torch.Generator] = []
    cands = [batches, getattr(batches, "sampler", None), getattr(batches, "batch_sampler", None),
             getattr(getattr(batches, "batch_sampler", None), "sampler", None)]
    for c in cands:
        g = getattr(c, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def _train_mode(optimizer: Any) -> bool:
    groups = getattr(optimizer, "param_groups", None)
    if not groups or "train_mode" not in groups[0]:
        raise TypeError(f"recalibrate: optimizer={type(optimizer).__name__} is not a schedule-free optimizer (its "
                        "param_groups have no 'train_mode'); pass optimizer=None if the model already holds the "
                        "weights to calibrate at")
    return bool(groups[0]["train_mode"])


def _unwrap(optimizer: Any) -> Any:
    """Ours behind Accelerate's / Lightning's / DeepSpeed's wrapper (the DeepSpeed facade), else as given."""
    from .deepspeed import find_optimizer
    ours = find_optimizer(optimizer)
    return optimizer if ours is None else ours


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable[Any], num_batches: int = 50, *,
                optimizer: Any = _REQUIRED, forward: Optional[Callable[[nn.Module, Any], Any]] = None,
                process_group: Any = None) -> int:
    """Re-estimate the running statistics of ``model``'s BatchNorm layers at x (see the module docstring).

    Args:
        model: what to run forward (a plain module, DDP, FSDP1/FSDP2, a DeepSpeed engine, a LightningModule).
        batches: an iterable of training batches (a DataLoader: a fresh iterator is taken); the first
            ``num_batches`` are used on this rank.
        num_batches: forward passes per rank (default 50; the same on every rank under DDP/FSDP/SyncBatchNorm).
        optimizer: **required**: the schedule-free optimizer (ours, schedulefree's, or a framework's wrapper
            of it), switched to x for the passes and back to its mode afterwards; or ``None`` when the model
            already holds the point to calibrate at.
        forward: ``forward(model, batch)``, default :func:`default_forward`.
        process_group: the data-parallel group the statistics are combined over (default: the world when
            torch.distributed is initialised; under tensor/pipeline parallelism pass the data-parallel group).

    Returns:
        the number of BatchNorm modules recalibrated (0: the model has none, nothing is run).
    """
    if optimizer is _REQUIRED:
        raise TypeError("recalibrate(model, batches, num_batches, optimizer=...): pass the schedule-free optimizer "
                        "(it is moved to x for the passes and back), or optimizer=None if the model already holds x "
                        "(after optimizer.eval()); statistics collected at y would be the ones this is meant to fix")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"recalibrate: num_batches must be an int >= 1, got {num_batches!r}")
    modules = running_stat_modules(model)
    if not modules:
        return 0
    opt = None if optimizer is None else _unwrap(optimizer)
    was_train = _train_mode(opt) if opt is not None else False
    forward = forward or default_forward
    device = _device(model) or torch.device("cpu")
    if device.type == "meta":
        raise RuntimeError("recalibrate: the model is on the meta device (it holds no data)")
    comm_device = device if (dist.is_available() and dist.is_initialized()
                             and dist.get_backend(process_group) != "gloo") else torch.device("cpu")
    flags = [(m, m.training) for m in model.modules()]
    gens = [(g, g.get_state()) for g in _generators(batches)]
    moments = [_Moments(m) for m in modules]
    handles = [m.register_forward_pre_hook(h) for m, h in zip(modules, moments)]
    rng_devices = [device] if device.type == "cuda" else []
    if opt is not None and was_train:
        opt.eval()
    try:
        try:
            with torch.random.fork_rng(devices=rng_devices, device_type=device.type if rng_devices else "cuda"):
                model.train()
                it = iter(batches)
                for _ in range(num_batches):
                    try:
                        batch = next(it)
                    except StopIteration:
                        break
                    forward(model, batch)
        finally:
            for g, st in gens:
                g.set_state(st)
            for h in handles:
                h.remove()
            for m, training in flags:
                m.training = training
        _combine(moments, process_group, comm_device)
    finally:
        if opt is not None and was_train:
            opt.train()
    return len(modules)
