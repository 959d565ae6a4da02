"""The optimizer's view of DeepSpeed ZeRO-1/2/3 (and the BF16_Optimizer path): :class:`DeepSpeedBackend`,
and the check that refuses a DeepSpeed wrapper stepping the optimizer without the driver.

DeepSpeed owns the parameters: it hands our optimizer one flat fp32 partition per param group
(ZeRO-1/2, BF16_Optimizer) or per sub-group (ZeRO-3). Those partitions are disjoint across the
data-parallel ranks, so the local sums of squares add up over that group (or, under
tensor/pipeline parallelism, over the world, each piece weighted by its replica count: the
driver sets :attr:`DeepSpeedBackend.pieces` and a weighted ``reduction``). A change of the
masters out of the step reaches the bit16 weights through the driver
(:meth:`DeepSpeedBackend.params_changed`).

Everything that *drives* DeepSpeed — the ``ZeroDriver`` that gathers DeepSpeed's group-by-group
``step()`` calls into one, and the table of every DeepSpeed internal it touches — is in the wing
above the optimizer, :mod:`sharded_msam_sf.deepspeed.driver`; this module never imports it.

Stepped by a ZeRO wrapper it is not bound to (an engine built with ``optimizer=`` ours and no
:func:`~sharded_msam_sf.deepspeed.attach`), the optimizer's ``step()`` asks
:func:`unbound_zero_wrapper` (through the binding, :mod:`.binding`), which looks up the Python
stack for a ``step``/``_optimizer_step`` frame whose ``self`` is one of DeepSpeed's wrappers
(``DeepSpeedZeroOptimizer``, ``DeepSpeedZeroOptimizer_Stage3``, ``BF16_Optimizer``,
``FP16_Optimizer``, ``FP16_UnfusedOptimizer``) holding this optimizer as ``.optimizer``; found,
the step raises. Only when ``deepspeed`` is imported and the optimizer is not bound.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional

import torch.distributed as dist
from torch import Tensor

from .base import Backend

__all__ = ["DeepSpeedBackend", "wrapper_kind", "wrapper_classes", "unbound_zero_wrapper", "refuse_unbound_zero"]


class DeepSpeedBackend(Backend):
    """Flat fp32 ZeRO partitions: local tensors as they are, the stats summed over the
    data-parallel group, out-of-step changes pushed to the bit16 weights by the driver. Under
    tensor/pipeline parallelism (an ``mpu``, a PipelineEngine) the driver sets a weighted
    reduction over the world and each flat partition's pieces by replica count
    (:mod:`sharded_msam_sf.deepspeed.parallel`)."""

    #: DeepSpeed hands the gradient partitions to the optimizer itself (a step with no ``.grad`` in sight
    #: is not an error), and its engine driver binds to this very instance (never re-resolved)
    hands_gradients = True
    pin_when_detected = True

    def __init__(self) -> None:
        self.group = None  # the ZeRO data-parallel process group, set by the driver
        self.driver: Optional[Any] = None
        self.pieces: Optional[Dict[int, Any]] = None  # id(flat fp32 partition) -> its pieces (model parallel)

    def all_reduce_(self, stats: Tensor) -> None:
        if self.reduction.weighted:
            self.reduction.apply_(stats)
        elif dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)

    def replica_pieces(self, p: Tensor):
        if self.pieces is None:
            return super().replica_pieces(p)
        try:
            return self.pieces[id(p)]
        except KeyError:
            raise RuntimeError("AdamWMSAMScheduleFree under DeepSpeed model parallelism: a parameter that is not one "
                               "of the engine's flat fp32 partitions reached the optimizer") from None


    def params_changed(self) -> None:
        if self.driver is not None:
            self.driver.params_changed()

def wrapper_kind(zero: Any) -> str:
    """Which DeepSpeed optimizer wrapper this is (by class, without importing deepspeed eagerly)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    if isinstance(zero, DeepSpeedZeroOptimizer_Stage3):
        return "zero3"
    if isinstance(zero, DeepSpeedZeroOptimizer):
        return "zero12"
    if isinstance(zero, BF16_Optimizer):
        return "bf16"
    raise NotImplementedError(
        f"sharded_msam_sf.deepspeed supports DeepSpeed's ZeRO stages 1, 2 and 3 (and its BF16_Optimizer); "
        f"this engine wraps the optimizer in {type(zero).__name__} (DeepSpeed's wrapper for fp16/bf16 without ZeRO): "
        f"set zero_optimization.stage to 1, 2 or 3")


def wrapper_classes() -> tuple:
    """DeepSpeed's optimizer wrappers that call a client optimizer's ``step()`` (ZeRO-1/2, ZeRO-3,
    BF16, and the fp16 ones without ZeRO, which the driver refuses)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    out = [DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer]
    try:
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        out += [FP16_Optimizer, FP16_UnfusedOptimizer]
    except ImportError:  # pragma: no cover - moved in another DeepSpeed version
        pass
    return tuple(out)


# (the fp16 wrappers also step the optimizer in initialize_optimizer_states, inside deepspeed.initialize)
_STEP_FRAMES = frozenset({"step", "_optimizer_step", "initialize_optimizer_states"})


def unbound_zero_wrapper(optimizer: Any) -> Optional[Any]:
    """The DeepSpeed wrapper that is running ``optimizer.step()`` right now, if the optimizer is
    not bound to it (else None). Only looked for when ``deepspeed`` is imported and the optimizer
    has no driver: the stack's ``step``/``_optimizer_step`` frames are checked for a ``self`` of
    :func:`wrapper_classes` whose ``.optimizer`` is this optimizer."""
    if "deepspeed" not in sys.modules:
        return None
    backend = optimizer.backend
    if getattr(backend, "driver", None) is not None:
        return None
    try:
        classes = wrapper_classes()
    except ImportError:  # pragma: no cover
        return None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in _STEP_FRAMES:
            obj = frame.f_locals.get("self")
            if isinstance(obj, classes) and getattr(obj, "optimizer", None) is optimizer:
                return obj
        frame = frame.f_back
    return None


def refuse_unbound_zero(optimizer: Any) -> None:
    """Raise if a DeepSpeed wrapper steps ``optimizer`` without the driver (:func:`sharded_msam_sf.deepspeed.attach`): it would compute
    ``||m||`` per rank and per (sub-)group, count ZeRO-3 sub-groups as steps, and leave
    ``train()``/``eval()`` off the engine's weights."""
    zero = unbound_zero_wrapper(optimizer)
    if zero is not None:
        wrapper_kind(zero)  # a wrapper attach() cannot bind (stage 0 fp16/bf16) raises its own NotImplementedError
        raise RuntimeError(
            f"AdamWMSAMScheduleFree is stepped by DeepSpeed's {type(zero).__name__} without being attached to the "
            f"engine (the step would use ||m|| per rank and per group): call "
            f"sharded_msam_sf.deepspeed.attach(engine) after deepspeed.initialize, or "
            f"sharded_msam_sf.deepspeed.register() before it (HF Trainer / Accelerate / Lightning)")
