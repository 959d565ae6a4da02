"""Measure the optimizer on the simulated rank: state bytes, the reduction, its collectives.

On the wrapped meta model (parameters are DTensors whose local shards are meta tensors) the
optimizer is built as a user builds it, inside :func:`~sharded_msam_sf.kernels.abstract.allow_meta_params`
(a dry run: meta state, eager kernels, a placeholder norm), and driven through one whole step
with zero gradients under :class:`~sharded_msam_sf.testing.comm_count.CommCounter`:

- one_pass: ``train()``, ``step()``;
- two_pass: ``train()``, ``move_to_ascent()``, new gradients, ``move_from_ascent()``, ``step()``;

then ``eval()`` and ``train()`` again, counted apart (they must issue nothing). Read off:

- ``local_param_elements``: Σ over params of the local shard's elements;
- ``state_bytes``: Σ over the state tensors (z, v, m) of the local shard's bytes;
- ``collectives_per_step``: every collective issued during those optimizer calls (only the optimizer
  runs there),
  as ``{"op", "bytes", "group_size", "shape"}``; ``collectives_train_eval`` likewise;
- the reduction: its group's size, the replica counts divided out (per count, the local
  elements that carry it), and whether it is weighted;
- :func:`~.shape_rule.counted_once` and, for 1-D shard dims, DTensor's local elements against
  the shape rule for this rank (``shape_rule_matches``).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from ..testing.comm_count import CommCounter
from ..kernels.abstract import allow_meta_params, real_mode
from ..optimizer import AdamWMSAMScheduleFree
from .shape_rule import counted_once

__all__ = ["measure_optimizer", "local", "calls_of"]


def local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def calls_of(records) -> List[Dict[str, Any]]:
    """``{"op", "bytes", "group_size", "shape"}`` per counted call."""
    return [{"op": c.name, "bytes": c.bytes, "group_size": c.group_size,
             "shape": list(c.shape) if c.shape is not None else None} for c in records]


def _calls(cc: CommCounter) -> List[Dict[str, Any]]:
    # every call counted while only optimizer methods ran (no engine work in between): the optimizer's
    return calls_of(cc.records)


def _zero_grads(params) -> None:
    for p in params:
        p.grad = torch.zeros_like(p)


def measure_optimizer(model: torch.nn.Module, *, sam_mode: str = "one_pass", opt_kwargs=None,
                      backward=None) -> Dict[str, Any]:
    """Build the optimizer on ``model``'s params, run one step, and report (see the module docstring).
    ``backward()``: computes the gradients (a real rank's forward and backward) in place of zeros."""
    params = [p for p in model.parameters() if p.requires_grad]
    set_grads = backward if backward is not None else (lambda: _zero_grads(params))
    with allow_meta_params():
        opt = AdamWMSAMScheduleFree(params, sam_mode=sam_mode, **(opt_kwargs or {}))
        backend = opt.backend
        opt.train()
        set_grads()
        with CommCounter() as cc:
            if sam_mode == "two_pass":
                opt.move_to_ascent()
                set_grads()
                opt.move_from_ascent()
            opt.step()
        with CommCounter() as cc_modes:
            opt.eval()
            opt.train()
    red = backend.reduction
    with real_mode():
        group_size = dist.get_world_size(red.group) if red.communicates else 1
    by_replicas: Counter = Counter()
    for p in params:
        by_replicas[backend.share(p).replicas] += local(p).numel()
    state_bytes = sum(local(t).numel() * local(t).element_size()
                      for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor))
    state_elements = {k: sum(local(st[k]).numel() for st in opt.state.values() if k in st)
                      for k in ("z", "exp_avg_sq", "exp_avg")}
    report = {
        "param_elements": sum(p.numel() for p in params),
        "local_param_elements": sum(local(p).numel() for p in params),
        "param_bytes": sum(local(p).numel() * local(p).element_size() for p in params),
        "state_bytes": state_bytes,
        "state_elements": state_elements,
        "master_bytes": 0,  # FSDP2 / TP: the fp32 sharded params are the masters, no second copy
        "state_dtype": str(next(iter(opt.state.values()))["z"].dtype) if opt.state else None,
        "reduction_group_size": group_size,
        "reduction_weighted": bool(red.weighted),
        "replicas_divided_out": {str(k): v for k, v in sorted(by_replicas.items())},
        "collectives_per_step": _calls(cc),
        "collectives_train_eval": _calls(cc_modes),
        "param_groups": len(opt.param_groups),
        "norm_count": counted_once(params, backend),
        "backend": type(backend).__name__,
    }
    return report
