"""Measure a schedule-free model at its evaluation weights x.

A schedule-free optimizer keeps the gradient point y (plus, for MSAM one_pass, the
perturbation) in the parameters while training; the weights that are evaluated —
and whose flatness matters — are the average x, which ``optimizer.eval()`` puts in
the parameters. ``evaluation_weights(optimizer)`` does that for a ``with`` block
and afterwards returns the optimizer to the mode it found it in.
"""

from __future__ import annotations

import contextlib


def _in_train_mode(optimizer) -> bool:
    """The optimizer's mode: its ``train_mode`` attribute or param-group key (as in
    ``schedulefree``) where it has one, else assumed to be training."""
    mode = getattr(optimizer, "train_mode", None)
    if isinstance(mode, bool):
        return mode
    for group in getattr(optimizer, "param_groups", []):
        if "train_mode" in group:
            return bool(group["train_mode"])
    return True


@contextlib.contextmanager
def evaluation_weights(optimizer):
    """``with evaluation_weights(opt): ...`` — the parameters hold x inside the block.

    Calls ``optimizer.eval()`` on entry if the optimizer is training and
    ``optimizer.train()`` on exit in that case. An optimizer without ``eval``/``train``
    (AdamW, PSGD) is left alone: its parameters are already what is evaluated.
    """
    has_modes = callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
    if optimizer is None or not has_modes:
        yield
        return
    was_training = _in_train_mode(optimizer)
    if was_training:
        optimizer.eval()
    try:
        yield
    finally:
        if was_training:
            optimizer.train()
