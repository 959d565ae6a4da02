"""DDP with an explicit group: replicas agree on every step through one tiny all-reduce.

DDP replicas hold identical params and, after DDP's gradient all-reduce,
identical gradients and optimizer state: the local ``||m||`` already is the
global one, and a NaN/inf in any rank's loss reaches every rank through that
gradient all-reduce. So ``AdamWMSAMScheduleFree(ddp_model.parameters())`` uses
:class:`~sharded_msam_sf.backends.LocalBackend` and communicates nothing (DDP
parameters are plain tensors: nothing in them says "DDP").

With ``model=ddp_model`` (or ``process_group=``) the optimizer uses this back end
instead: the stats are all-reduced with MAX over the DDP group — the sums of
squares are equal on every replica, so MAX never double counts — which costs one
all-reduce of ``G + 1`` float64 per gradient evaluation and guarantees that every
rank skips the same steps even when a gradient is changed after DDP's all-reduce
(e.g. by a rank-local hook).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ._comm import all_reduce_stats_, group_ranks
from .base import Backend

__all__ = ["DDPBackend"]


class DDPBackend(Backend):
    """Replicated parameters whose ranks agree on the stats (MAX over ``process_group``)."""

    name = "ddp"

    def __init__(self, process_group=None, device: Optional[torch.device] = None) -> None:
        self._group = process_group
        self._device = device

    @property
    def process_group(self):
        return self._group

    def all_reduce_(self, stats: Tensor) -> None:
        all_reduce_stats_(stats, self._group, self._device, op=dist.ReduceOp.MAX)

    def __repr__(self) -> str:
        return f"DDPBackend(group_ranks={group_ranks(self._group)})"
