"""One process (and DDP replicas left to DDP).

DDP replicas hold identical parameters and, after DDP's gradient all-reduce, identical
gradients, so each replica's optimizer state (z, v, m) is the same and the local ``||m||``
already is the global one: no collective is needed. A NaN on one rank reaches every rank
through DDP's all-reduce, so every replica skips the same steps without a flag exchange.
(``model=ddp_model`` selects :class:`~sharded_msam_sf.backends.ddp.DDPBackend` instead.)
"""
from __future__ import annotations

from .base import Backend

__all__ = ["LocalBackend"]


class LocalBackend(Backend):
    """Unsharded parameters: one process, or DDP replicas (every :class:`Share` is ``LOCAL``)."""
