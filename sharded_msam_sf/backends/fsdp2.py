"""FSDP2 (``fully_shard``), HSDP, either with tensor parallelism, and any DTensor parameters.

- **Local shards**: ``fully_shard`` parameters (and their gradients) are DTensors;
  ``to_local()`` is a view of this rank's piece of the sharded storage that the
  next all-gather reads, possibly uneven or empty. The optimizer state is created
  with ``clone``/``zeros_like`` of the DTensor param, so it is a DTensor with the
  same mesh and placements: ``torch.distributed.checkpoint`` can save it sharded
  and reshard it on load. The math only ever sees ``to_local()`` views.
- **Shares** (from each DTensor's placements, read against the ROOT device mesh its mesh
  was sliced from: :mod:`.mesh_shares`): one group for all parameters, the root mesh's
  ranks, and per parameter ``replicas`` = the product of the sizes of the root dims along
  which it is not sharded — ``Replicate`` dims, and root dims absent from its own submesh
  (a LayerNorm that is not tensor-parallel, ``fully_shard``-ed on the dp submesh, is held
  by every tp rank). A dim along which no parameter is sharded (HSDP's replicate dim) is
  left out of the group instead, when a group over the other dims exists. Examples:
  1-D FSDP mesh — the mesh's group, 1; HSDP ``(Replicate, Shard(0))`` — the shard
  dim's group, 1; FSDP2 + TP on dp × tp — all ranks, a Colwise weight 1, a Rowwise bias
  or a LayerNorm ``tp``; HSDP + TP on replicate × shard × tp — all ranks (or a flattened
  (shard, tp) mesh made by the user), the replicate dim counted in the replicas. When the
  counts differ the reduction is ``weighted``: still one all-reduce of ``G + 1`` scalars.
  ``Partial`` placements, params on different root meshes and plain tensors next to
  DTensors are refused. ``pipeline_group=`` (this rank's pipeline stages): those ranks
  hold different parameters, summed over, never counted as replicas. ``process_group=``:
  that group, one replica for every parameter (overrides all of this).
- **Out-of-step changes**: FSDP2 keeps the root module unsharded after a forward
  (and every module whose ``reshard_after_forward``/``reshard_after_backward`` is
  off), and a later forward reuses those full parameters without reading the
  shards. After every change (train/eval swap, ascent, removal, step)
  ``params_changed()`` calls ``FSDPModule.reshard()`` on the FSDP modules that own
  the params, which frees the stale unsharded copies (no communication); the next
  forward all-gathers the new values as usual. The modules are found from the
  params (torch's registry of ``fully_shard`` states) or from ``model=``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor

from .base import Backend, Reduction, Share
from .mesh_shares import mesh_shares

__all__ = ["FSDP2Backend", "is_dtensor", "fsdp2_modules"]


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        return None
    return DTensor


def is_dtensor(t: Tensor) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def _fsdp_param_groups(state) -> list:
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch < 2.8 had one group per state
        one = getattr(state, "_fsdp_param_group", None)
        groups = [one] if one is not None else []
    return [g for g in groups if g is not None]


def _owns(state, ids: set) -> bool:
    for pg in _fsdp_param_groups(state):
        for fp in getattr(pg, "fsdp_params", ()):
            if id(getattr(fp, "sharded_param", None)) in ids:
                return True
    return False


def fsdp2_modules(params: Sequence[Tensor], model: Optional[torch.nn.Module] = None) -> List[torch.nn.Module]:
    """The ``fully_shard`` modules that own any of ``params`` (one per FSDP state).

    With ``model`` the search walks ``model.modules()``; otherwise it reads torch's
    registry of composable states (``torch.distributed._composable_state``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    ids = {id(p) for p in params}
    if model is not None:
        candidates = [m for m in model.modules() if isinstance(m, FSDPModule)]
    else:
        from torch.distributed import _composable_state as cs
        candidates = [m for m in list(cs._module_state_mapping.keys()) if isinstance(m, FSDPModule)]
    out, seen = [], set()
    for m in candidates:
        state = m._get_fsdp_state()
        if id(state) in seen or not _owns(state, ids):
            continue
        seen.add(id(state))
        out.append(m)
    return out


class FSDP2Backend(Backend):
    """DTensor parameters: FSDP2 ``fully_shard`` on a 1-D mesh, HSDP, and either with tensor parallelism.

    ``process_group``: every parameter's sum of squares adds up over this group, one replica
    (overrides the mesh). ``model``: the wrapped model, to find the ``fully_shard`` modules.
    ``pipeline_group``: the process group of this rank's pipeline stages (ranks that hold
    different parameters): summed over, never counted as replicas (:mod:`.mesh_shares`)."""

    def __init__(self, params: Iterable[Tensor], *, process_group=None,
                 model: Optional[torch.nn.Module] = None, pipeline_group=None) -> None:
        params = list(params)
        plain = [p for p in params if not is_dtensor(p)]
        if plain:
            raise ValueError(
                f"AdamWMSAMScheduleFree: {len(plain)} of {len(params)} parameters are plain tensors next to "
                "DTensor (FSDP2) parameters; their squared norm would be counted once per rank. Apply "
                "fully_shard to the root module too (fully_shard(model) after the blocks), or give the "
                "replicated parameters their own optimizer")
        if process_group is not None or not params:
            self._shares: Dict[int, Share] = {id(p): Share(process_group, 1) for p in params}
        else:
            group, replicas = mesh_shares(params, pipeline_group)
            self._shares = {id(p): Share(group, replicas[id(p)]) for p in params}
        self.reduction = Reduction.of(self._shares.values(), params[0].device if params else None)
        self._modules = fsdp2_modules(params, model)

    def share(self, p: Tensor) -> Share:
        return self._shares[id(p)]

    @property
    def fsdp_modules(self) -> List[torch.nn.Module]:
        return list(self._modules)

    def local(self, t: Tensor) -> Tensor:
        if is_dtensor(t):
            # under no_grad (every optimizer method) this is the DTensor's own local
            # tensor: a view of the sharded storage, written in place
            return t.to_local()
        return t

    def params_changed(self) -> None:
        for m in self._modules:
            m.reshard()

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, fsdp_modules={len(self._modules)})"
