"""A loud warning when a ``transformers.Trainer`` saves AdamWMSAMScheduleFree without
:class:`sharded_msam_sf.integrations.hf.ScheduleFreeCallback`.

Without the callback the Trainer saves its model while the optimizer is in train mode: every checkpoint's
model file and the final ``save_model()`` hold y (one_pass: ``y + s·m``), the training point, not the
averaged x that Schedule-Free evaluates and ships. The Trainer gives no hook to code that it was not handed,
so :meth:`AdamWMSAMScheduleFree.state_dict` (which the Trainer calls at each checkpoint) calls
:func:`warn_if_trainer_without_callback`: it looks up the call stack for a ``transformers.Trainer`` (only
when ``transformers.trainer`` is imported and the optimizer is in train mode) and warns once per optimizer,
naming the fix. (Lightning refuses to fit without its callback: its optimizer hooks allow that.)
"""
from __future__ import annotations

import sys
import warnings
from typing import Any

__all__ = ["warn_if_trainer_without_callback", "NO_CALLBACK"]

NO_CALLBACK = (
    "AdamWMSAMScheduleFree: the HF Trainer is saving a checkpoint without ScheduleFreeCallback, so the saved "
    "model holds y (the training point, plus the SAM ascent in one_pass), not x (the averaged weights that "
    "Schedule-Free evaluates and ships); so will save_model() after train(). Add "
    "callbacks=[sharded_msam_sf.integrations.hf.ScheduleFreeCallback()] or use "
    "sharded_msam_sf.integrations.hf.MSAMTrainer; for checkpoints already written, "
    "`python -m sharded_msam_sf.export CKPT --out DIR` computes x from the saved optimizer state")


def _trainer_on_stack(limit: int = 40) -> Any:
    mod = sys.modules.get("transformers.trainer")
    cls = getattr(mod, "Trainer", None)
    if cls is None:
        return None
    frame = sys._getframe(2)
    for _ in range(limit):
        if frame is None:
            return None
        me = frame.f_locals.get("self")
        if isinstance(me, cls):
            return me
        frame = frame.f_back
    return None


def warn_if_trainer_without_callback(optimizer: Any) -> None:
    """Warn once (per optimizer) when a transformers Trainer without ScheduleFreeCallback saves it in train
    mode (see the module docstring)."""
    if getattr(optimizer, "_hf_no_callback_warned", False):
        return
    trainer = _trainer_on_stack()
    if trainer is None:
        return
    from .hf import ScheduleFreeCallback
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", [])
    if any(isinstance(c, ScheduleFreeCallback) for c in callbacks):
        return
    optimizer._hf_no_callback_warned = True
    warnings.warn(NO_CALLBACK, UserWarning, stacklevel=3)
