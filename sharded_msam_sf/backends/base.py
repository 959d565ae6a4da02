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
tensor parallelism on a dp × tp mesh a Colwise weight is (all ranks, 1) and a Rowwise bias
or a LayerNorm that is not tensor-parallel (all ranks, tp).

:class:`Reduction` turns the shares of all parameters into the one all-reduce. All
parameters must add up over the same rank set (else it raises and names ``process_group=``).
When they also agree on ``replicas`` the stats are summed over the group and the sums of
squares divided by that count afterwards (``uniform``). When the counts differ (tensor
parallelism: sharded and replicated parameters in one optimizer) the reduction is
``weighted``: the optimizer divides each parameter's local sum of squares by its own replica
count *before* the one all-reduce,

    stats_g = Σ_p sumsq_r(local m_p) / replicas(p),   then SUM over the group,

so the cost stays one all-reduce of ``G + 1`` scalars. A back end whose local tensors mix
elements of different replica counts (a DeepSpeed flat partition holding tensor-parallel and
replicated params) overrides :meth:`Backend.replica_pieces` to give the element ranges of each
count. The non-finite flag is summed alike (it only needs to be > 0 somewhere).

A new engine is one new file: a subclass that sets ``reduction`` from its params' shares
and overrides ``local``/``params_changed`` where its tensors need it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Tuple

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
    """The one all-reduce of the stats: SUM over ``group``; then, if not ``weighted``, the sums of
    squares ÷ ``replicas`` (``weighted``: the optimizer already divided each parameter's local
    sum of squares by its own replica count, :meth:`Backend.replica_pieces`)."""

    group: Any = LOCAL
    replicas: int = 1
    device: Optional[torch.device] = None  # where the collective runs (NCCL cannot reduce CPU tensors)
    weighted: bool = False

    @classmethod
    def of(cls, shares: Iterable[Share], device: Optional[torch.device] = None) -> "Reduction":
        """The reduction for these parameters' shares (one rank set; see the module docstring)."""
        by_object = {}  # the groups' ranks are read once per distinct group object
        for s in shares:
            by_object.setdefault((id(s.group), s.replicas), [s, 0])[1] += 1
        kinds = {}
        for s, n in by_object.values():
            key = (tuple(group_ranks(s.group)) if s.group is not LOCAL else LOCAL, s.replicas)
            kinds.setdefault(key, [s, 0])[1] += n
        if not kinds:
            return cls(LOCAL, 1, device)
        rank_sets = {k[0] for k in kinds}
        if len(rank_sets) > 1:
            desc = ", ".join(f"{n} params summed over ranks {list(k[0]) if k[0] is not LOCAL else 'this process'}"
                             f" with {k[1]} replica(s)" for k, (_, n) in kinds.items())
            raise ValueError(
                "AdamWMSAMScheduleFree: the parameters' sums of squares add up over different rank sets "
                f"({desc}); one optimizer per such set of parameters, or pass "
                "process_group= (the group over which the local sums of squares add up to the global one, "
                "counting each element once)")
        if len(kinds) == 1:
            (share, _), = kinds.values()
            return cls(share.group, share.replicas, device)
        share = next(iter(kinds.values()))[0]
        if share.group is LOCAL:
            raise ValueError("AdamWMSAMScheduleFree: parameters held by this process alone cannot have replicas")
        return cls(share.group, 1, device, weighted=True)

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
    #: the engine hands the optimizer its gradients itself (DeepSpeed's driver sets them on its flat
    #: partitions for the call): ``step()`` with no ``.grad`` in sight is then not a missing backward
    hands_gradients: bool = False
    #: an engine driver binds to this very instance once it is detected: late binding keeps it
    #: (never re-resolved when the params change, as a ``backend=`` given by the user)
    pin_when_detected: bool = False

    def local(self, t: Tensor) -> Tensor:
        """The tensor this rank holds for ``t`` (here: ``t``)."""
        return t

    def share(self, p: Tensor) -> Share:
        """How ``p``'s local sum of squares adds into the global one (here: it is the global one)."""
        return Share(LOCAL, 1)

    def replica_pieces(self, p: Tensor) -> Sequence[Tuple[Optional[Tuple[int, int]], int]]:
        """``p``'s local elements by replica count: ``(range, replicas)`` pairs, ``range`` a
        ``(begin, end)`` of the flattened local tensor or None for all of it. Read only when
        the reduction is ``weighted``; the default is the whole tensor with ``share(p).replicas``."""
        return ((None, self.share(p).replicas),)

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
        count = "replicas=per parameter" if r.weighted else f"replicas={r.replicas}"
        return f"{type(self).__name__}(group_ranks={group_ranks(r.group)}, {count})"
