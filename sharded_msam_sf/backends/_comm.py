"""The one collective the optimizer issues: an all-reduce of the small stats tensor.

Kept in one place so that the back ends (and the tests that count collectives)
agree on what is sent: ``stats`` is float64 ``[sumsq_0, …, sumsq_{G−1}, nonfinite]``.
NCCL cannot reduce a CPU tensor, so the stats travel on the params' device when
they were computed elsewhere (a rank with no gradients computes them on the CPU).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def all_reduce_stats_(stats: torch.Tensor, group, device: Optional[torch.device], op=None) -> None:
    """``stats ← reduce(stats)`` over ``group`` (None: the default group), SUM unless ``op`` is given."""
    op = dist.ReduceOp.SUM if op is None else op
    if device is not None and stats.device != device and device.type != "meta":
        moved = stats.to(device)
        dist.all_reduce(moved, op=op, group=group)
        stats.copy_(moved)
    else:
        dist.all_reduce(stats, op=op, group=group)


def group_ranks(group) -> list:
    """Global ranks of ``group`` (for messages and repr)."""
    try:
        return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    except Exception:  # pragma: no cover - not initialised / not a member
        return []
