"""DDP with an explicit group: replicas agree on every step through one tiny all-reduce.

DDP replicas hold identical params and, after DDP's gradient all-reduce, identical
gradients and optimizer state: the local ``||m||`` already is the global one, and a NaN/inf
in any rank's loss reaches every rank through that gradient all-reduce. So
``AdamWMSAMScheduleFree(ddp_model.parameters())`` uses
:class:`~sharded_msam_sf.backends.LocalBackend` and communicates nothing (DDP parameters
are plain tensors: nothing in them says "DDP").

With ``model=ddp_model`` (or ``process_group=`` next to plain params) the optimizer uses
this back end instead: every parameter's share is the whole DDP group with ``size(group)``
replicas, so the stats are summed over the group and the sums of squares divided by its
size. That costs one all-reduce of ``G + 1`` float64 per gradient evaluation and
guarantees that every rank computes the same norm and skips the same steps even when a
gradient is changed after DDP's all-reduce (e.g. by a rank-local hook).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .base import Backend, Reduction, Share

__all__ = ["DDPBackend"]


class DDPBackend(Backend):
    """Replicated parameters whose ranks agree on the stats (one all-reduce over ``process_group``)."""

    def __init__(self, process_group=None, device: Optional[torch.device] = None) -> None:
        group = process_group if process_group is not None else dist.group.WORLD
        self._share = Share(group, dist.get_world_size(group))
        self.reduction = Reduction.of([self._share], device)

    def share(self, p: Tensor) -> Share:
        return self._share
