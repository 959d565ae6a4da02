"""DTensor's shape rule, for every rank: local elements, the all-ranks sweep, each element once.

``Shard(d)`` over ``n`` ranks gives rank ``i`` the rows ``[i·c, min((i+1)·c, rows))`` with
``c = ceil(rows/n)`` (torch's ``torch.chunk`` rule): the first ranks hold ``c`` rows, the last
ones fewer or none. So at large ``n`` the fullest rank holds more than ``P/n`` elements (at
n = 1024, a 4096-row weight gives every rank 4 rows, but a 32000-row embedding gives ranks
0…999 32 rows each and ranks 1000…1023 none).

- :func:`local_numel`: DTensor's own ``_compute_local_shape_and_global_offset`` for a given
  mesh coordinate (any rank, not only this one);
- :func:`all_ranks_1d`: per shard rank, the state bytes ``12 × Σ_p local elements`` of 1-D
  FSDP2 / HSDP's shard dim, the fullest and the lightest rank, and the check that the ranks of
  one shard group sum to exactly ``12·P``;
- :func:`counted_once`: ``Σ_{ranks of the reduction group} Σ_p local(p)/replicas(p)``, which
  must be the global element count exactly (each element of ``||m||`` counted once).
"""
from __future__ import annotations

import itertools
import math
from fractions import Fraction
from functools import lru_cache
from typing import Any, Dict, List, Sequence, Tuple

import torch.distributed as dist
from torch import Tensor

__all__ = ["rows_on", "local_numel", "all_ranks_1d", "counted_once", "STATE_BYTES_PER_ELEMENT", "UNEVEN_NOTE"]

STATE_BYTES_PER_ELEMENT = 12  # z, v, m in fp32 (ALGORITHM.md); AdamW: 8

UNEVEN_NOTE = ("FSDP2 gives each rank ceil(rows/N) rows (DTensor's Shard(0) rule), so the fullest rank holds "
               "more than 12·P/N bytes of state and the last ranks less; the ranks still sum to exactly 12·P")


def rows_on(rows: int, n: int, i: int) -> int:
    """Rows of a ``rows``-row tensor on shard ``i`` of ``n`` (torch.chunk: ceil(rows/n) each, the rest last)."""
    c = -(-rows // n)
    return max(0, min(c, rows - i * c))


@lru_cache(maxsize=None)
def _local(shape: Tuple[int, ...], mesh_shape: Tuple[int, ...], coord: Tuple[int, ...], placements: tuple) -> int:
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    local, _ = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), placements)
    return math.prod(local)


def local_numel(p: Tensor, coord: Sequence[int]) -> int:
    """Elements of DTensor ``p`` held at coordinate ``coord`` of its own (sub)mesh (DTensor's rule)."""
    return _local(tuple(p.shape), tuple(p.device_mesh.mesh.shape), tuple(coord), tuple(p.placements))


def all_ranks_1d(shapes: Sequence[Tuple[int, ...]], n: int) -> Dict[str, Any]:
    """The state bytes of every shard rank ``0 … n−1`` of ``Shard(0)`` params of ``shapes``."""
    per_rank = [0] * n
    total = 0
    for shape in shapes:
        numel = math.prod(shape)
        total += numel
        if not shape:
            raise ValueError("a 0-dim parameter cannot be Shard(0)-ed")
        rows, width = shape[0], numel // shape[0] if shape[0] else 0
        c = -(-rows // n)
        full, rest = divmod(rows, c) if c else (0, 0)
        for i in range(full):      # the ranks with c rows
            per_rank[i] += c * width
        if rest:
            per_rank[full] += rest * width
    state = [STATE_BYTES_PER_ELEMENT * e for e in per_rank]
    fullest = max(range(n), key=state.__getitem__)
    lightest = min(range(n), key=state.__getitem__)
    even = STATE_BYTES_PER_ELEMENT * total / n
    return {
        "shard_ranks": n,
        "param_elements": total,
        "state_bytes_sum": sum(state),
        "state_bytes_expected_sum": STATE_BYTES_PER_ELEMENT * total,
        "sum_is_12P": sum(state) == STATE_BYTES_PER_ELEMENT * total,
        "fullest_rank": fullest, "fullest_state_bytes": state[fullest],
        "lightest_rank": lightest, "lightest_state_bytes": state[lightest],
        "even_share_bytes": even,
        "fullest_over_even": state[fullest] / even if even else 0.0,
        "state_bytes_per_rank": state,
        "note": UNEVEN_NOTE,
    }


def _root_coord(root, rank: int) -> Tuple[int, ...]:
    hit = (root.mesh == rank).nonzero()
    return tuple(int(x) for x in hit[0].tolist())


def counted_once(params: Sequence[Tensor], backend, pipeline_dim: str = "pp") -> Dict[str, Any]:
    """``Σ_{r in the reduction group, this stage} Σ_p local_r(p)/replicas(p)`` against ``Σ_p numel(p)``.

    Each rank's local elements come from DTensor's shape rule at that rank's coordinates (the
    param's submesh dims are root dims by name); ``replicas(p)`` is the back end's (the same on
    every rank of the group, by the mesh's symmetry). Ranks of other pipeline stages hold other
    params and are left out. Exact (fractions)."""
    from ..backends.mesh_shares import root_mesh
    from ..kernels.abstract import real_mode
    with real_mode():
        group = backend.reduction.group
        ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        dts = [p for p in params if hasattr(p, "device_mesh")]
        counted = Fraction(0)
        if not dts:  # plain tensors (DDP): every rank of the group holds every element
            coords = ranks
            for p in params:
                counted += Fraction(p.numel() * len(ranks), backend.share(p).replicas)
        else:
            root = root_mesh(dts[0].device_mesh)
            names = list(root.mesh_dim_names or ())
            me = _root_coord(root, dist.get_rank())
            stage_dim = names.index(pipeline_dim) if pipeline_dim in names else None
            coords = [_root_coord(root, r) for r in ranks]
            if stage_dim is not None:
                coords = [c for c in coords if c[stage_dim] == me[stage_dim]]
            for p in params:
                sub = list(p.device_mesh.mesh_dim_names or ())
                if any(n not in names for n in sub):
                    return {"checked": False, "reason": f"a parameter lives on a flattened mesh {sub}"}
                idx = [names.index(n) for n in sub]
                replicas = backend.share(p).replicas  # (uniform: the reduction's one count; weighted: p's own)
                held = sum(local_numel(p, [c[i] for i in idx]) for c in coords)
                counted += Fraction(held, replicas)
        total = sum(p.numel() for p in params)
    return {"checked": True, "ranks": len(coords), "elements_counted": float(counted),
            "param_elements": total, "each_element_once": counted == total}
