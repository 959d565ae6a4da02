"""The contract between the optimizer and a sharding engine.

The optimizer (``optimizer.py``) does all the math on *local* tensors and asks its back end
three things, never calling ``torch.distributed`` itself:

- ``local(t)``: the tensor this rank holds for ``t`` (a DTensor's local shard, a flat
  partition, or ``t`` itself), which in-place math may write;
- ``all_reduce_(stats)``: turn the small float64 tensor ``[sumsq_0, …, sumsq_{G−1}, nonfinite]``
  of per-group local sums of squares of ``m`` and the non-finite-gradient flag into the global
  one, with one all-reduce — the only collective the optimizer adds, once per gradient
  evaluation;
- ``params_changed()``: make an out-of-step change of the params (train/eval swap, ascent,
  removal, step) visible to the next forward (drop stale unsharded FSDP params, push
  DeepSpeed fp32 masters to the bit16 weights).

How the reduction is derived — the placement-aware part, per parameter. Each back end says,
for every parameter ``p``, a :class:`Share`: the process ``group`` over whose ranks the local
sums of squares of ``p`` are added, and ``replicas``, how many ranks of that group hold each
element (identical copies, counted once). Then

    ||m||² = Σ_{ranks r of group} Σ_p  sumsq_r(local m_p) / replicas(p).

Examples: one process — no group (nothing to reduce); FSDP2 on a 1-D mesh and FSDP1 — the
shard group, 1; HSDP ``(Replicate, Shard)`` — the shard dimension's group, 1 (the replica
groups are left out of the sum, so each element is counted once without a division; the
whole mesh with 2 replicas would be equally right); DDP — the DDP group, its size. Under
tensor parallelism a Rowwise bias on a dp × tp mesh would be (all ranks, tp) and a Colwise
weight (all ranks, 1). :class:`Reduction` turns the shares of all parameters into the one
all-reduce (SUM over the group, then each sum of squares divided by the replica count; the
flag only needs to be > 0 somewhere). Today every parameter of one optimizer must share the
same group and replica count; tensor parallelism (a Colwise weight sharded over dp × tp, a
LayerNorm replicated over tp) needs per-parameter weights ``1/replicas`` inside the sums
and one all-reduce over the union group: :meth:`Reduction.of` raises for such mixes and
says so, rather than count a replica twice.

A new engine is one new file: a subclass that sets ``reduction`` from its params' shares
and overrides ``local``/``params_changed`` where its tensors need it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Backend", "Share", "Reduction", "LOCAL"]


@dataclass(frozen=True)
class Share:
    """How one parameter's local sum of squares adds into the global one.

    ``group``: the process group whose ranks' local sums are added (:data:`LOCAL`: this
    process alone, no collective). ``replicas``: how many ranks of ``group`` hold each element
    of the parameter (1: the ranks hold disjoint shards; ``size(group)``: every rank holds
    the whole parameter, as under DDP)."""

    group: Any
    replicas: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.replicas, int) and self.replicas >= 1):
            raise ValueError(f"Invalid replicas: {self.replicas!r} (valid: an integer >= 1)")


LOCAL: Any = "local"  # Share.group for a parameter held by this process alone


def group_ranks(group) -> list:
    """Global ranks of ``group`` (for messages, comparisons and repr); ``[]`` for :data:`LOCAL`."""
    if group is LOCAL or not (dist.is_available() and dist.is_initialized()):
        return []
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


@dataclass(frozen=True)
class Reduction:
    """The one all-reduce of the stats: SUM over ``group``, then the sums of squares ÷ ``replicas``."""

    group: Any = LOCAL
    replicas: int = 1
    device: Optional[torch.device] = None  # where the collective runs (NCCL cannot reduce CPU tensors)

    @classmethod
    def of(cls, shares: Iterable[Share], device: Optional[torch.device] = None) -> "Reduction":
        """The reduction for these parameters' shares (all alike; see the module docstring)."""
        by_object = {}  # the groups' ranks are read once per distinct group object
        for s in shares:
            by_object.setdefault((id(s.group), s.replicas), [s, 0])[1] += 1
        kinds = {}
        for s, n in by_object.values():
            key = (tuple(group_ranks(s.group)) if s.group is not LOCAL else LOCAL, s.replicas)
            kinds.setdefault(key, [s, 0])[1] += n
        if not kinds:
            return cls(LOCAL, 1, device)
        if len(kinds) > 1:
            desc = ", ".join(f"{n} params summed over ranks {list(k[0]) if k[0] is not LOCAL else 'this process'}"
                             f" with {k[1]} replica(s)" for k, (_, n) in kinds.items())
            raise ValueError(
                "AdamWMSAMScheduleFree: the parameters' sums of squares add up over different rank sets or "
                f"replica counts ({desc}); one optimizer per such set of parameters, or pass "
                "process_group= (the group over which the local sums of squares add up to the global one, "
                "counting each element once)")
        (share, _), = kinds.values()
        return cls(share.group, share.replicas, device)

    @property
    def communicates(self) -> bool:
        return self.group is not LOCAL

    def apply_(self, stats: Tensor) -> None:
        """``stats ← Σ_group stats``, then ``stats[:-1] /= replicas`` (the last entry is the flag)."""
        if not self.communicates:
            return
        op = dist.ReduceOp.SUM
        if self.device is not None and stats.device != self.device and self.device.type != "meta":
            moved = stats.to(self.device)
            dist.all_reduce(moved, op=op, group=self.group)
            stats.copy_(moved)
        else:
            dist.all_reduce(stats, op=op, group=self.group)
        if self.replicas != 1:
            stats[:-1] /= self.replicas


class Backend:
    """One process: the tensors are local, nothing to reduce, nothing cached outside the params."""

    reduction: Reduction = Reduction()

    def local(self, t: Tensor) -> Tensor:
        """The tensor this rank holds for ``t`` (here: ``t``)."""
        return t

    def share(self, p: Tensor) -> Share:
        """How ``p``'s local sum of squares adds into the global one (here: it is the global one)."""
        return Share(LOCAL, 1)

    @property
    def process_group(self):
        """The group of the optimizer's one all-reduce (None on one process)."""
        return None if self.reduction.group is LOCAL else self.reduction.group

    def all_reduce_(self, stats: Tensor) -> None:
        """Make the local ``[sumsq_0, …, sumsq_{G−1}, nonfinite]`` global, in place (one all-reduce)."""
        self.reduction.apply_(stats)

    def params_changed(self) -> None:
        """Nothing caches the params outside the tensors themselves on one process."""

    def __repr__(self) -> str:
        r = self.reduction
        if not r.communicates:
            return f"{type(self).__name__}()"
        return f"{type(self).__name__}(group_ranks={group_ranks(r.group)}, replicas={r.replicas})"
