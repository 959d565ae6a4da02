"""FSDP1 (``FullyShardedDataParallel``), ``use_orig_params`` True or False.

- **Local shards**: with ``use_orig_params=False`` the optimizer gets one
  ``FlatParameter`` per FSDP unit; between forwards its data is this rank's padded
  flat shard (the padding, at the end of the last ranks' shards, has zero
  gradient, so m, v stay zero there and z, y keep their zeros). With
  ``use_orig_params=True`` it gets the original parameters as 1-D views into that
  shard, of size 0 on ranks that hold none of a parameter. Either way the tensor
  the optimizer holds *is* the local shard: ``local(t) = t``, and the state
  (``clone``/``zeros_like``) has the shard's shape. FSDP1's optimizer state dict
  (used by ``torch.distributed.checkpoint.state_dict``) unflattens/reshards it.
- **Shares**: each parameter's local sum of squares adds up over its handle's
  ``process_group`` (the shard group; for ``HYBRID_SHARD`` the intra-node group, so the
  replica groups are left out and nothing is counted twice), one replica per element;
  ``NO_SHARD`` units hold whole copies: ``size(group)`` replicas. ``process_group=``
  replaces the handles' groups.
- **Out-of-step changes**: FSDP1 does not free the root unit's unsharded flat
  parameter after a forward (nor any unit's under ``SHARD_GRAD_OP``); it points
  the params back at the shard but keeps the full copy, and the next forward
  reuses it without an all-gather. ``params_changed()`` frees that copy on the
  handles that own the params (no communication), so the next forward gathers
  the new values.
- **Finding the handles**: a ``FlatParameter`` or an original parameter does not
  reference its ``FlatParamHandle``. With ``model=`` they are read from the FSDP
  modules; without it, the garbage collector's list of live objects is searched
  once, at construction, for the handles whose flat parameter holds our params
  (about 0.15 s per million live container objects on a 2-core CPU). If a
  parameter's handle cannot be found, the constructor raises and names ``model=``.
"""
from __future__ import annotations

import gc
from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .base import Backend, Reduction, Share

__all__ = ["FSDP1Backend", "is_fsdp1_param", "fsdp1_handles"]


def is_fsdp1_param(t: Tensor) -> bool:
    """A ``FlatParameter`` or an original parameter flattened into one (``use_orig_params=True``)."""
    return bool(getattr(t, "_is_flat_param", False) or getattr(t, "_fsdp_flattened", False))


def _handle_cls():
    from torch.distributed.fsdp._flat_param import FlatParamHandle
    return FlatParamHandle


def fsdp1_handles(model: Optional[torch.nn.Module] = None) -> List:
    """The live ``FlatParamHandle`` objects: of ``model`` if given, else every one in the process."""
    cls = _handle_cls()
    if model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        handles = []
        for m in FSDP.fsdp_modules(model):
            h = getattr(m, "_handle", None)
            if h is not None:
                handles.append(h)
        return handles
    return [o for o in gc.get_objects() if type(o) is cls]  # type(): no __class__ lookups on proxies


def _members(handle) -> List[Tensor]:
    fp = handle.flat_param
    return [fp] + list(getattr(fp, "_params", None) or []) + list(getattr(fp, "_shared_params", None) or [])


class FSDP1Backend(Backend):
    """FSDP1 ``FullyShardedDataParallel`` parameters (flat or original)."""

    def __init__(self, params: Iterable[Tensor], *, process_group=None,
                 model: Optional[torch.nn.Module] = None) -> None:
        params = list(params)
        plain = [p for p in params if not is_fsdp1_param(p)]
        if plain:
            raise ValueError(
                f"AdamWMSAMScheduleFree: {len(plain)} of {len(params)} parameters are not managed by FSDP "
                "(ignored_modules?) next to FSDP1 parameters; their squared norm would be counted once per "
                "rank. Give them their own optimizer")
        by_id: Dict[int, object] = {}
        for h in fsdp1_handles(model):
            for t in _members(h):
                by_id.setdefault(id(t), h)
        owners, missing = [], 0
        for p in params:
            h = by_id.get(id(p))
            if h is None:
                missing += 1
            elif all(h is not o for o in owners):
                owners.append(h)
        if missing:
            where = "in model" if model is not None else "among the live FSDP units"
            raise ValueError(
                f"AdamWMSAMScheduleFree: the FSDP1 unit of {missing} parameter(s) was not found {where}; pass "
                "model= (the FullyShardedDataParallel-wrapped model), so that the optimizer can find the "
                "process group and free stale unsharded parameters after train()/eval()")
        self._handles = owners
        device = params[0].device if params else None
        self._shares: Dict[int, Share] = {}
        for p in params:
            h = by_id[id(p)]
            group = process_group if process_group is not None else h.process_group
            self._shares[id(p)] = Share(group, 1 if h.uses_sharded_strategy else dist.get_world_size(group))
        self.reduction = Reduction.of(self._shares.values(), device)

    def share(self, p: Tensor) -> Share:
        return self._shares[id(p)]

    @property
    def handles(self) -> List:
        return list(self._handles)

    @staticmethod
    def _keeps_unsharded(h) -> bool:
        """The handle holds an allocated unsharded flat param that the next forward would reuse."""
        if not h.uses_sharded_strategy or not hasattr(h.flat_param, "_full_param_padded"):
            return False  # NO_SHARD, or before FSDP's lazy init (nothing gathered yet)
        return not h.needs_unshard()

    def params_changed(self) -> None:
        for h in self._handles:
            if self._keeps_unsharded(h):
                h.reshard(True)
                h.post_reshard()
                h._prefetched = False

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, units={len(self._handles)})"
