"""Sharding back ends: which tensors are local, which ranks reduce the norm.

``detect_backend(params)`` chooses from the parameters themselves, so that
``AdamWMSAMScheduleFree(model.parameters())`` is right for every engine without
extra arguments:

- DTensor parameters (FSDP2 ``fully_shard``, HSDP): :class:`FSDP2Backend`;
- FSDP1 flat parameters or their ``use_orig_params`` views: :class:`FSDP1Backend`;
- plain tensors (one process, DDP): :class:`LocalBackend` — or
  :class:`DDPBackend` when ``model=`` is a ``DistributedDataParallel`` or a
  ``process_group=`` is given.

``process_group=`` overrides the group that reduces the norm; ``model=`` (the
wrapped model) lets the FSDP back ends find their modules without searching.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .base import Backend
from .local import LocalBackend

__all__ = ["Backend", "LocalBackend", "DDPBackend", "FSDP1Backend", "FSDP2Backend", "detect_backend"]


def __getattr__(name):  # the engine back ends import torch.distributed pieces lazily
    if name == "FSDP2Backend":
        from .fsdp2 import FSDP2Backend
        return FSDP2Backend
    if name == "FSDP1Backend":
        from .fsdp1 import FSDP1Backend
        return FSDP1Backend
    if name == "DDPBackend":
        from .ddp import DDPBackend
        return DDPBackend
    raise AttributeError(name)


def detect_backend(params: Iterable[torch.Tensor], *, process_group=None,
                   model: Optional[torch.nn.Module] = None) -> Backend:
    """The back end for these parameters (plain tensors: :class:`LocalBackend`)."""
    params = list(params)
    from .fsdp2 import is_dtensor
    if any(is_dtensor(p) for p in params):
        from .fsdp2 import FSDP2Backend
        return FSDP2Backend(params, process_group=process_group, model=model)
    from .fsdp1 import is_fsdp1_param
    if any(is_fsdp1_param(p) for p in params):
        from .fsdp1 import FSDP1Backend
        return FSDP1Backend(params, process_group=process_group, model=model)
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel) or process_group is not None:
        from .ddp import DDPBackend
        group = process_group if process_group is not None else model.process_group
        return DDPBackend(group, device=params[0].device if params else None)
    return LocalBackend()
