"""Pipeline parallelism (``torch.distributed.pipelining``): one optimizer per stage, one norm over all stages.

A pipeline splits the model into stages on different ranks; each rank builds one optimizer
over its stage's params (a data-parallel stage: DDP, or FSDP2 ``fully_shard`` on the stage's
data-parallel group). The ascent needs the norm of ``m`` over the *whole* model and every
rank must skip the same steps, so with ``pipeline_group=`` (the group over this rank's
pipeline stages: ``world_mesh["pp"].get_group()``, or the ``group`` given to
``PipelineStage``) the optimizer's back end is a :class:`PipelineBackend`: it wraps the back
end that the params of this stage get on their own (``inner``: local for plain params, DDP
for ``model=`` a DDP stage, FSDP2 for ``fully_shard`` stages) and makes its one all-reduce
span the stages. Stages hold different params, never replicas, so

    ||m||² = Σ_{stages s} Σ_{ranks r of s's inner group} Σ_p sumsq_r(local m_p) / replicas(p),

with ``replicas(p)`` the inner share's count (DDP: the dp size; FSDP2 shards: 1). The
reduction is ``weighted`` (each rank divides its local sums by their replica counts before
the sum), so stages with different engines or replica counts add up correctly.

The group of the all-reduce is the union of the inner group across the stages:

- inner back end local (plain params; DDP params without ``model=``, whose replicas agree
  without communication): ``pipeline_group`` itself;
- one stage (``pipeline_group`` of size 1): the inner group;
- otherwise: the whole world when ``size(pipeline_group) × size(inner group)`` is the world
  size (a pp × dp mesh); else (e.g. HSDP, whose shard groups leave the replicas out) pass
  ``process_group=`` — a group of exactly those ranks: this rank's inner group on every stage.

``process_group=`` next to ``pipeline_group=`` therefore names the group of the one
all-reduce over all stages (checked: it holds this rank's pipeline peers and inner group and
has their product's size); the inner back end is detected from the params alone.

The all-reduce sends two float64 scalars: the sum of the groups' weighted sums of squares
(groups without the ascent contribute 0: their ``m`` is not read) and the non-finite flag,
so stages may have different numbers of param groups. One all-reduce per gradient
evaluation, as for every engine.

**One optimizer per stage without** ``pipeline_group=`` **is wrong** (each stage would
scale its ascent by its own part of the norm, and skip steps alone). The optimizer finds
live ``PipelineStage`` objects that own its params at its first gradient evaluation
(:func:`check_stages`: one scan of the garbage collector's objects, done only when
``torch.distributed.pipelining`` is imported) and raises then; a pipeline built by other
means cannot be detected.
"""
from __future__ import annotations

import gc
import inspect
import sys
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .base import LOCAL, Backend, Reduction, Share, group_ranks

__all__ = ["PipelineBackend", "check_pipeline_group", "accepts_pipeline_group", "live_stages", "check_stages"]


def check_pipeline_group(group) -> List[int]:
    """The global ranks of ``group`` after checking it is a process group holding this rank."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("Invalid pipeline_group: torch.distributed is not initialised (call "
                         "dist.init_process_group() before building the optimizer)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"Invalid pipeline_group: expected a torch.distributed.ProcessGroup over this rank's pipeline "
                        f"stages (e.g. world_mesh['pp'].get_group()), got {type(group).__name__}")
    ranks = group_ranks(group)
    if dist.get_rank() not in ranks:
        raise ValueError(f"Invalid pipeline_group: this rank ({dist.get_rank()}) is not in it (ranks {ranks})")
    return ranks


def accepts_pipeline_group(backend_cls: type) -> bool:
    """Whether an engine back end's constructor takes ``pipeline_group=`` itself (then its shares
    already span the stages, e.g. DTensors on a (pp, dp) mesh)."""
    return "pipeline_group" in inspect.signature(backend_cls.__init__).parameters


def _union_group(inner_group: Any, pp_ranks: Sequence[int], pipeline_group, process_group,
                 spans_stages: bool) -> Any:
    """The group of the one all-reduce over all stages (see the module docstring)."""
    me = dist.get_rank()
    inner = group_ranks(inner_group) if inner_group is not LOCAL else [me]
    if spans_stages:
        missing = sorted(set(pp_ranks) - set(inner))
        if missing:
            raise ValueError(f"AdamWMSAMScheduleFree: the back end was given pipeline_group= but its group (ranks "
                             f"{inner}) lacks the pipeline ranks {missing}")
        return inner_group if process_group is None else process_group
    overlap = sorted(set(pp_ranks) & set(inner) - {me})
    if overlap:
        raise ValueError(
            f"Invalid pipeline_group: ranks {overlap} are both pipeline peers of this rank and in its data-parallel "
            f"group (ranks {inner}); stages hold different params, so pipeline_group= must hold one rank per "
            "stage (world_mesh['pp'].get_group(), the group given to PipelineStage)")
    need = len(pp_ranks) * len(inner)
    if process_group is not None:
        given = group_ranks(process_group)
        if len(given) != need or not set(pp_ranks) | set(inner) <= set(given):
            raise ValueError(
                f"Invalid process_group: next to pipeline_group= it is the group of the one all-reduce over all "
                f"stages, which must hold exactly this rank's data-parallel group (ranks {inner}) on each of the "
                f"{len(pp_ranks)} stages (pipeline ranks {list(pp_ranks)}): {need} ranks, got {given}")
        return process_group
    if len(pp_ranks) == 1:
        return inner_group
    if inner_group is LOCAL:
        return pipeline_group
    if need == dist.get_world_size():
        return dist.group.WORLD
    raise ValueError(
        f"AdamWMSAMScheduleFree: the stages' data-parallel groups (this rank's: {inner}) over the "
        f"{len(pp_ranks)} pipeline stages (ranks {list(pp_ranks)}) make {need} ranks, not the world "
        f"({dist.get_world_size()}); pass process_group= (a group of this rank's data-parallel group on every "
        "stage, built on every rank with dist.new_group) — the group of the one all-reduce over all stages")


class PipelineBackend(Backend):
    """One stage's back end (``inner``) with its all-reduce spanning all pipeline stages.

    ``local``, ``share``'s replica count, ``replica_pieces`` and ``params_changed`` are the inner
    back end's; the reduction is ``weighted`` over the union group (module docstring)."""

    def __init__(self, inner: Backend, pipeline_group, *, process_group=None, spans_stages: bool = False,
                 device: Optional[torch.device] = None) -> None:
        if type(inner).__name__ == "DeepSpeedBackend":
            raise ValueError("pipeline_group= is for torch.distributed.pipelining stages; a DeepSpeed engine sets its "
                             "own reduction group (use DeepSpeed's PipelineEngine, see docs/deepspeed.md)")
        if isinstance(inner, PipelineBackend):
            raise ValueError("pipeline_group= was given twice: the back end already spans the pipeline stages")
        self.inner = inner
        self.pipeline_group = pipeline_group
        pp_ranks = check_pipeline_group(pipeline_group)
        group = _union_group(inner.reduction.group, pp_ranks, pipeline_group, process_group, spans_stages)
        self.reduction = Reduction(group, 1, device if device is not None else inner.reduction.device, weighted=True)

    def local(self, t: Tensor) -> Tensor:
        return self.inner.local(t)

    def share(self, p: Tensor) -> Share:
        return Share(self.reduction.group, self.inner.share(p).replicas)

    def replica_pieces(self, p: Tensor) -> Sequence[Tuple[Optional[Tuple[int, int]], int]]:
        return self.inner.replica_pieces(p)

    def all_reduce_(self, stats: Tensor) -> None:
        """``[Σ_g sumsq_g, flag]`` summed over the union group (one all-reduce of two float64),
        written back as ``[total, 0, …, 0, flag]`` (the optimizer adds the groups' slots)."""
        if not self.reduction.communicates:
            return
        packed = torch.stack([stats[:-1].sum(), stats[-1]])
        self.reduction.apply_(packed)
        stats.zero_()
        if stats.numel() > 1:
            stats[0] = packed[0]
        stats[-1] = packed[1]

    def params_changed(self) -> None:
        self.inner.params_changed()

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, inner={self.inner!r})"


# ---------------------------------------------------------------- finding stages without pipeline_group=
def live_stages(params: Iterable[Tensor]) -> list:
    """The live ``torch.distributed.pipelining`` stages whose module owns any of ``params``
    (``[]`` when that package is not imported; else one scan of the collector's objects)."""
    module = sys.modules.get("torch.distributed.pipelining.stage")
    base = getattr(module, "_PipelineStageBase", None)
    if base is None:
        return []
    ids = {id(p) for p in params}
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, base):
            submod = getattr(obj, "submod", None)
            if submod is not None and any(id(q) in ids for q in submod.parameters()):
                found.append(obj)
    return found


def check_stages(params: Iterable[Tensor], pipeline_group) -> None:
    """Raise when ``params`` belong to a stage of a multi-rank pipeline and ``pipeline_group``
    is missing or is not that pipeline's group."""
    for stage in live_stages(params):
        ranks = group_ranks(stage.group if stage.group is not None else dist.group.WORLD)
        if len(ranks) <= 1:
            continue
        where = (f"pipeline stage {stage.stage_index} of {stage.num_stages} (a {type(stage).__name__} whose "
                 f"group is ranks {ranks})")
        if pipeline_group is None:
            raise ValueError(
                f"AdamWMSAMScheduleFree: the parameters belong to {where}, but pipeline_group= was not given: "
                "the norm of m and the NaN flag would span this stage alone (a different ascent per stage). "
                "Pass pipeline_group= (the group given to PipelineStage, e.g. world_mesh['pp'].get_group())")
        if group_ranks(pipeline_group) != ranks:
            raise ValueError(f"Invalid pipeline_group: ranks {group_ranks(pipeline_group)}, but the parameters "
                             f"belong to {where}; pass that stage's group")
