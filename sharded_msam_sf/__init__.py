"""sharded_msam_sf: Schedule-Free AdamW with a Momentum-SAM ascent, sharded by the engine you run.

``from sharded_msam_sf import AdamWMSAMScheduleFree`` — see ``ALGORITHM.md`` for the math
and the README for the training loops (one_pass, two_pass, DDP, FSDP, DeepSpeed).
"""
from .hyperparams import SAM_MODES, default_rho
from .optimizer import AdamWMSAMScheduleFree
from .reference import AdamWMSAMScheduleFreeReference
from . import save_guards as _save_guards
from .integrations.hf_guard import warn_if_trainer_without_callback as _hf_guard

_save_guards.register(_hf_guard)  # warns when a transformers Trainer saves without ScheduleFreeCallback

__all__ = ["AdamWMSAMScheduleFree", "AdamWMSAMScheduleFreeReference", "SAM_MODES", "default_rho"]
__version__ = "0.1.0"
