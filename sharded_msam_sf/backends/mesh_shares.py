"""Where DTensor parameters' local sums of squares add up: their ROOT device mesh.

FSDP2, HSDP and tensor parallelism (``parallelize_module``) all place parameters on
slices of one root ``DeviceMesh`` (``init_device_mesh(..., mesh_dim_names=("dp", "tp"))``;
``mesh["dp"]`` and ``mesh["tp"]`` are submeshes of it). A parameter's DTensor only shows the
(sub)mesh it lives on: a ``fully_shard``-ed LayerNorm that is not tensor-parallel lives on
``mesh["dp"]`` and says nothing about the tp ranks that hold identical copies of it. So every
parameter is read against the root mesh, with one group for all parameters:

- the root dims along which ``p`` is **sharded**: those inside one of its mesh dims whose
  placement is ``Shard``/``_StridedShard`` (a flattened dim — ``mesh["a", "b"]._flatten()`` —
  covers several root dims; found by rank sets, not by names);
- **stage dims** (only with ``pipeline_group=``): the root dims whose ranks through this rank
  are the pipeline group's; their ranks hold different parameters, so they are summed over
  and never counted as replicas;
- every other root dim — ``Replicate`` in the placements, or absent from ``p``'s submesh —
  holds identical copies: ``replicas(p) = Π size(d)`` over those dims of the group.

The group spans the root mesh's ranks, so that with ``Σ_ranks sumsq_r(p) / replicas(p)``
each element counts once (a weighted reduction when the counts differ, ``base.Reduction``).
A root dim along which *no* parameter is sharded (HSDP's replicate dim) is dropped from the
group instead of divided — the sum over the remaining dims already counts each element once —
when a group for the remaining dims exists: one root dim's group, a flattened mesh already made
by the user (``root._flatten_mapping``), or WORLD. Otherwise nothing is dropped (no process
group is created here: that is a collective every rank of the world would have to join).
Nothing is dropped with ``pipeline_group=``: stages hold different parameters, and the group
must be the same on every stage.

The whole root mesh's group is WORLD when the root spans the world, or its one dim's group on a
1-D root, or a flattened mesh of all its dims made by the user; else this raises and names
``process_group=``. With ``pipeline_group=`` and a root mesh that does not contain the pipeline
dim (one data-parallel mesh per stage), the group must still span all stages: WORLD when
(root mesh ranks) × (pipeline stages) is the world, else this raises.
"""
from __future__ import annotations

import math
from typing import Dict, FrozenSet, List, Sequence, Tuple

import torch.distributed as dist
from torch import Tensor

from ..kernels.abstract import real_mode

__all__ = ["root_mesh", "mesh_shares", "PIPELINE_DIM_NAMES"]

# a root mesh dim of one of these names holds pipeline stages: refused without pipeline_group=
PIPELINE_DIM_NAMES = frozenset({"pp", "pipe", "pipeline"})

_HINT = ("pass process_group= (the group over which the local sums of squares add up to the global one, "
         "counting each element once)")


def root_mesh(mesh):
    """The root ``DeviceMesh`` that ``mesh`` was sliced or flattened from (``mesh`` itself for a root)."""
    get = getattr(mesh, "_get_root_mesh", None)
    if get is not None:
        return get()
    from torch.distributed.device_mesh import _mesh_resources  # torch < 2.9
    return _mesh_resources.get_root_mesh(mesh)


def _ranks_along(mesh, dim: int) -> FrozenSet[int]:
    """The global ranks of ``mesh`` along ``dim`` through this rank."""
    coord = mesh.get_coordinate()
    if coord is None:
        raise ValueError(f"AdamWMSAMScheduleFree: rank {dist.get_rank()} is not in the device mesh {mesh}")
    index = tuple(slice(None) if i == dim else c for i, c in enumerate(coord))
    return frozenset(mesh.mesh[index].reshape(-1).tolist())


def _is_sharding(pl) -> bool:
    """Shard or _StridedShard (FSDP2 over a tensor-parallel dim); Replicate is not; Partial is refused."""
    if pl.is_partial():
        raise ValueError("AdamWMSAMScheduleFree: a DTensor parameter has a Partial placement; "
                         "parameters must be Shard or Replicate")
    if pl.is_replicate():
        return False
    if pl.is_shard() or hasattr(pl, "split_factor"):
        return True
    raise ValueError(f"AdamWMSAMScheduleFree: unknown DTensor placement {pl!r}; {_HINT}")


def _sharded_root_dims(p: Tensor, root_dims: Sequence[FrozenSet[int]]) -> FrozenSet[int]:
    """The root dims along which ``p`` is sharded: those inside one of its sharded mesh dims."""
    mesh = p.device_mesh
    out, shards = set(), 1
    for d, pl in enumerate(p.placements):
        if not _is_sharding(pl):
            continue
        along = _ranks_along(mesh, d)
        shards *= len(along)
        out |= {r for r, ranks in enumerate(root_dims) if ranks <= along}
    if math.prod(len(root_dims[r]) for r in out) != shards:
        raise ValueError(f"AdamWMSAMScheduleFree: cannot place the mesh {mesh} of a DTensor parameter in its root "
                         f"mesh {root_mesh(mesh)}; {_HINT}")
    return frozenset(out)


def _same_root(roots: List) -> None:
    first = roots[0]
    for r in roots[1:]:
        if r is not first and not (r.mesh.shape == first.mesh.shape and bool((r.mesh == first.mesh).all())):
            raise ValueError(
                f"AdamWMSAMScheduleFree: the DTensor parameters live on different device meshes ({first} and {r}); "
                "slice every mesh (tensor parallel, data parallel) from one init_device_mesh, or " + _HINT)


def _ranks_of(root, dims: FrozenSet[int]) -> FrozenSet[int]:
    """The global ranks that differ from this rank only along ``dims`` of ``root``."""
    coord = root.get_coordinate()
    index = tuple(slice(None) if i in dims else c for i, c in enumerate(coord))
    return frozenset(root.mesh[index].reshape(-1).tolist())


def _group_over(root, dims: FrozenSet[int]):
    """An existing process group over ``dims`` of ``root`` through this rank, or None."""
    if len(dims) == 1:
        return root.get_group(next(iter(dims)))
    ranks = _ranks_of(root, dims)
    if len(ranks) == dist.get_world_size():
        return dist.group.WORLD
    for flat in getattr(root, "_flatten_mapping", {}).values():
        if frozenset(flat.mesh.reshape(-1).tolist()) == ranks:
            return flat.get_group(0)
    return None


def mesh_shares(params: Sequence[Tensor], pipeline_group=None) -> Tuple[object, Dict[int, int]]:
    """``(group, {id(p): replicas(p)})`` for DTensor ``params`` (see the module docstring). The meshes'
    rank tables are real host tensors: read with ``FakeTensorMode`` off (an optimizer built inside one)."""
    with real_mode():
        return _mesh_shares(params, pipeline_group)


def _mesh_shares(params: Sequence[Tensor], pipeline_group=None) -> Tuple[object, Dict[int, int]]:
    roots = [root_mesh(p.device_mesh) for p in params]
    _same_root(roots)
    root = roots[0]
    all_dims = frozenset(range(root.ndim))
    root_dims = [_ranks_along(root, r) for r in range(root.ndim)]
    sharded = {id(p): _sharded_root_dims(p, root_dims) for p in params}

    stage: FrozenSet[int] = frozenset()
    group = None
    if pipeline_group is not None:
        stages = frozenset(dist.get_process_group_ranks(pipeline_group))
        stage = frozenset(r for r, ranks in enumerate(root_dims) if ranks == stages)
        if not stage and len(stages) > 1:
            group = _across_stages(root, stages)
    else:
        names = [n for n in (root.mesh_dim_names or ()) if n in PIPELINE_DIM_NAMES]
        if names:
            raise ValueError(f"AdamWMSAMScheduleFree: the root device mesh has a pipeline dim {names[0]!r}; "
                             "pass pipeline_group= (the process group of this rank's pipeline stages), "
                             "or " + _HINT)

    kept = all_dims
    if group is None and pipeline_group is None:
        used = frozenset().union(*sharded.values())
        if used and used != all_dims:
            group = _group_over(root, used)
            if group is not None:
                kept = used
    if group is None:
        group = _group_over(root, all_dims)
        if group is None:
            raise ValueError(
                f"AdamWMSAMScheduleFree: the DTensor parameters' root device mesh {root} spans part of the world "
                f"and has no process group over all of its ranks; {_HINT}, e.g. mesh._flatten().get_group()")
    replicas = {k: math.prod(len(root_dims[r]) for r in kept - dims - stage) for k, dims in sharded.items()}
    return group, replicas


def _across_stages(root, stages: FrozenSet[int]):
    """WORLD, when the root mesh (one stage's) times the stages is the world; else raise."""
    me = dist.get_rank()
    root_ranks = frozenset(root.mesh.reshape(-1).tolist())
    if root_ranks & stages == {me} and len(root_ranks) * len(stages) == dist.get_world_size():
        return dist.group.WORLD
    raise ValueError(
        f"AdamWMSAMScheduleFree: the pipeline group {sorted(stages)} is no dim of the DTensor parameters' root "
        f"device mesh {root}, and the root mesh's {len(root_ranks)} ranks times the {len(stages)} stages are not "
        f"the world of {dist.get_world_size()} ranks; {_HINT} (spanning every stage)")
