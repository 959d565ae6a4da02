"""Checks that run when the optimizer's state is saved (``AdamWMSAMScheduleFree.state_dict()``).

The optimizer names no framework; a framework integration that needs to see a save registers a callable
``guard(optimizer)`` here (the package root registers
:func:`sharded_msam_sf.integrations.hf_guard.warn_if_trainer_without_callback`). Guards must be cheap
and must not raise for an ordinary save.
"""
from __future__ import annotations

from typing import Any, Callable, List

__all__ = ["GUARDS", "register", "run"]

GUARDS: List[Callable[[Any], None]] = []


def register(guard: Callable[[Any], None]) -> None:
    if guard not in GUARDS:
        GUARDS.append(guard)


def run(optimizer: Any) -> None:
    for guard in GUARDS:
        guard(optimizer)
