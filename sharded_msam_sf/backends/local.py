"""Single process and DDP.

DDP replicas hold identical parameters and, after DDP's gradient all-reduce,
identical gradients, so each replica's optimizer state (z, v, m) is the same and
the local ``||m||`` already is the global one: no collective is needed. A NaN on
one rank reaches every rank through DDP's all-reduce, so every replica skips
the same steps without a flag exchange.
"""
from __future__ import annotations

from .base import Backend


class LocalBackend(Backend):
    """Unsharded parameters: one process or DDP replicas."""

    name = "local"
