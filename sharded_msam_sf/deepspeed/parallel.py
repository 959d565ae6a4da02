"""DeepSpeed ZeRO under tensor parallelism (``mpu=``) and pipeline parallelism (``PipelineEngine``):
the placement-aware reduction of the optimizer's stats.

Under ZeRO alone every rank of the data-parallel group holds a disjoint piece of each flat fp32
group, so the local sums of squares add up over that group (:class:`~.zero.DeepSpeedBackend`).
With a model-parallel unit (``deepspeed.initialize(..., mpu=mpu)``, Megatron style, or the
pipeline grid ``engine.grid``) the ZeRO partitions stay over the data-parallel group, but the
model itself is spread over ``dp × tp × pp`` ranks:

- a *tensor-parallel* parameter (``param.model_parallel`` or ``param.tensor_model_parallel``
  true: DeepSpeed's ``is_model_parallel_parameter``, what its own gradient clipping reads) is a
  different shard on each of the ``tp`` ranks: every element sits on one rank (replicas 1);
- any other parameter (a row-parallel bias, a LayerNorm, a head) is the same on the ``tp``
  ranks: each element sits on ``tp`` ranks (replicas ``tp``);
- a pipeline stage's parameters are its own (replicas 1 across stages), except a tied module
  (``TiedLayerSpec``), held by each of its ``n`` stages (DeepSpeed all-reduces its gradient over
  them): replicas × ``n``.

So the stats are summed over all ``dp · tp · pp`` ranks (the world: anything else is refused),
with each element's square divided by its replica count before the one all-reduce
(:class:`~.base.Reduction` ``weighted``)::

    ||m||² = Σ_{all ranks r} Σ_{pieces of r's flat partitions}  sumsq(piece) / replicas(piece)

A flat ZeRO partition mixes parameters of both counts, so :func:`flat_pieces` cuts each flat
fp32 partition into element ranges by the parameter they hold, from DeepSpeed's own maps:
ZeRO-1/2 and the BF16_Optimizer ``lp._hp_mapping.get_hp_fragment_address()`` (``start``,
``numel`` of ``lp``'s fragment in the partition: what its universal checkpoint reads), ZeRO-3
the sub-group's parameters in order, ``p.partition_numel()`` elements each. Padding is in no
range: it holds zeros, whose squares add nothing. The cost stays one all-reduce of ``G + 1``
scalars per gradient evaluation, over the world instead of the data-parallel group.

two_pass under the ``PipelineEngine`` is refused (:func:`refuse_pipeline_two_pass`):
``engine.train_batch()`` evaluates the gradient *and* steps the optimizer in one call (its
schedule ends in ``OptimizerStep``), so there is no point between a first gradient and the step
where the ascent ``move_to_ascent()`` and a second gradient evaluation could go.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch.distributed as dist
from torch import Tensor

__all__ = ["ParallelLayout", "parallel_layout", "flat_pieces", "param_replicas",
           "refuse_pipeline_two_pass"]

Pieces = Tuple[Tuple[Optional[Tuple[int, int]], int], ...]


@dataclass(frozen=True)
class ParallelLayout:
    """The ranks that hold the model: ``dp`` (the ZeRO partitions) × ``tp`` (tensor) × ``pp``
    (pipeline stages); the stats are summed over all of them (the world group)."""

    dp: int
    tp: int
    pp: int

    @property
    def group(self) -> Any:
        return dist.group.WORLD


def model_parallel_unit(engine: Any, zero: Any) -> Any:
    """The engine's ``mpu`` (the pipeline grid for a PipelineEngine), else the ZeRO wrapper's."""
    mpu = getattr(engine, "mpu", None) if engine is not None else None
    return mpu if mpu is not None else getattr(zero, "mpu", None)


def parallel_layout(engine: Any, zero: Any) -> Optional[ParallelLayout]:
    """The layout when the model is tensor- or pipeline-parallel (None when it is not: the
    plain ZeRO reduction over the data-parallel group applies). Raises where the ranks are not
    ``dp × tp × pp`` = the world, or under sequence parallelism (not handled)."""
    from deepspeed.utils.bwc import bwc_pipeline_parallel_world_size, bwc_tensor_model_parallel_world_size
    mpu = model_parallel_unit(engine, zero)
    if mpu is None:
        return None
    tp = int(bwc_tensor_model_parallel_world_size(mpu))
    pp = int(bwc_pipeline_parallel_world_size(mpu))
    if tp == 1 and pp == 1:
        return None
    sp = getattr(mpu, "get_sequence_parallel_world_size", None)
    if sp is not None and int(sp()) > 1:
        raise NotImplementedError("AdamWMSAMScheduleFree under DeepSpeed: sequence parallelism (an mpu with "
                                  "get_sequence_parallel_world_size() > 1) together with tensor/pipeline "
                                  "parallelism is not supported")
    dp = dist.get_world_size(zero.dp_process_group)
    world = dist.get_world_size()
    if dp * tp * pp != world:
        raise NotImplementedError(
            f"AdamWMSAMScheduleFree under DeepSpeed with model parallelism: the data-parallel ({dp}) × tensor-"
            f"parallel ({tp}) × pipeline ({pp}) ranks are not the {world} ranks of the world; the global ||m|| "
            f"is summed over the world, so every rank must hold a part of this one model")
    return ParallelLayout(dp, tp, pp)


def _tied_counts(engine: Any) -> Dict[int, int]:
    """id(param) → the number of pipeline stages holding it: the tied weights of
    ``PipelineModule.tied_comms`` (only its ``weight_attr`` params, whose gradients DeepSpeed
    all-reduces over the tied stages; another param of a tied module is a copy per stage that
    evolves on its own, counted on each)."""
    module = getattr(engine, "module", None)
    counts: Dict[int, int] = {}
    for comm in (getattr(module, "tied_comms", None) or {}).values():
        for attr in comm["weight_attr"]:
            counts[id(getattr(comm["module"], attr))] = len(comm["ranks"])
    return counts


def param_replicas(p: Tensor, layout: ParallelLayout, tied: Dict[int, int]) -> int:
    """How many of the ``dp·tp·pp`` ranks hold each element of the (bit16) parameter ``p``, counted
    over the ranks that hold the same ZeRO partition position: 1 for a tensor-parallel parameter,
    ``tp`` for one replicated across the tensor-parallel ranks; × the stages of a tied module."""
    from deepspeed.runtime.utils import is_model_parallel_parameter
    return (1 if is_model_parallel_parameter(p) else layout.tp) * tied.get(id(p), 1)


def _merge(ranges: List[Tuple[int, int, int]]) -> Pieces:
    """Sorted ``(begin, end, replicas)`` ranges → pieces, adjacent ranges of one count joined."""
    out: List[List[int]] = []
    for b, e, r in sorted(ranges):
        if e <= b:
            continue
        if out and out[-1][1] == b and out[-1][2] == r:
            out[-1][1] = e
        else:
            out.append([b, e, r])
    return tuple(((b, e), r) for b, e, r in out)


def _hp_mapped_pieces(lp_groups: Sequence[Sequence[Tensor]], flats: Sequence[Tensor],
                      replicas) -> Dict[int, Pieces]:
    """ZeRO-1/2, BF16_Optimizer: each lp param's fragment address in its group's fp32 partition."""
    out: Dict[int, Pieces] = {}
    for lps, flat in zip(lp_groups, flats):
        ranges = []
        for lp in lps:
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is None:
                continue  # not in this rank's partition
            address = mapping.get_hp_fragment_address()
            ranges.append((int(address.start), int(address.start) + int(address.numel), replicas(lp)))
        out[id(flat)] = _merge(ranges)
    return out


def _zero3_pieces(zero: Any, replicas) -> Dict[int, Pieces]:
    """ZeRO-3: a sub-group's fp32 flat is its params' partitions in order, ``partition_numel()`` each."""
    out: Dict[int, Pieces] = {}
    for params, flat in zip(zero.fp16_groups, zero.fp32_partitioned_groups_flat):
        ranges, at = [], 0
        for p in params:
            n = int(p.partition_numel())
            ranges.append((at, at + n, replicas(p)))
            at += n
        if at != flat.numel():
            raise NotImplementedError(f"ZeRO-3: a sub-group's fp32 partition has {flat.numel()} elements, its "
                                      f"params' partitions {at}: this DeepSpeed version's layout is not supported")
        out[id(flat)] = _merge(ranges)
    return out


def flat_pieces(engine: Any, zero: Any, kind: str, layout: ParallelLayout) -> Dict[int, Pieces]:
    """id(flat fp32 partition) → its ``((begin, end), replicas)`` pieces (``Backend.replica_pieces``)."""
    tied = _tied_counts(engine)

    def replicas(p):
        return param_replicas(p, layout, tied)

    if kind == "zero12":
        return _hp_mapped_pieces(zero.bit16_groups, zero.single_partition_of_fp32_groups, replicas)
    if kind == "bf16":
        return _hp_mapped_pieces(zero.bf16_groups, zero.fp32_groups_flat_partition, replicas)
    return _zero3_pieces(zero, replicas)


def refuse_pipeline_two_pass(engine_or_model: Any, sam_modes: Iterable[str]) -> None:
    """Raise if one of ``sam_modes`` is two_pass and
    ``engine_or_model`` is a ``PipelineEngine`` or a ``PipelineModule`` (see the module docstring)."""
    if engine_or_model is None or "two_pass" not in set(sam_modes) or "deepspeed" not in sys.modules:
        return
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.engine import PipelineEngine
    if isinstance(engine_or_model, (PipelineEngine, PipelineModule)):
        raise NotImplementedError(
            "AdamWMSAMScheduleFree: sam_mode='two_pass' cannot run under DeepSpeed's PipelineEngine: "
            "engine.train_batch() evaluates the gradient and steps the optimizer in one call, so there is no "
            "place for move_to_ascent() and the second gradient evaluation a two_pass step needs; use "
            "sam_mode='one_pass' (one gradient per step, at the ascent point)")
