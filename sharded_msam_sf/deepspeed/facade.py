"""Our optimizer's API on a DeepSpeed engine's weights: :func:`attach` (bind the AdamWMSAMScheduleFree
inside an engine, built by :func:`~.initialize.initialize` or by someone else: HF Trainer, Accelerate,
Lightning), the facade :class:`DeepSpeedMSAMOptimizer` it returns, :func:`facade_of` and
:func:`find_optimizer` (ours behind a framework's optimizer wrappers).

The facade's ``train``/``eval``/``move_to_ascent``/``move_from_ascent``/``state_dict`` act on the
engine's weights; ``engine.step()`` stays the step. two_pass::

    loss = engine(x, y); engine.backward(loss)
    optimizer.move_to_ascent()
    loss2 = engine(x, y); engine.backward(loss2)
    optimizer.move_from_ascent()
    engine.step()

How the optimizer is coupled to DeepSpeed's ZeRO optimizers (and every DeepSpeed internal
that takes): :mod:`.driver`.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, Optional, Union

import torch

from ..backends.zero import DeepSpeedBackend, wrapper_classes
from ..optimizer import AdamWMSAMScheduleFree
from .driver import ZeroDriver, bind
from .weights import full_fp32_state_dict

__all__ = ["attach", "facade_of", "find_optimizer", "DeepSpeedMSAMOptimizer"]


def attach(engine: Any) -> "DeepSpeedMSAMOptimizer":
    """Bind the :class:`AdamWMSAMScheduleFree` inside a DeepSpeed engine (ZeRO-1/2/3 or the
    BF16_Optimizer) and return the facade; idempotent.

    ``engine`` is the ``DeepSpeedEngine`` — built by :func:`initialize`, or elsewhere with
    ``deepspeed.initialize(optimizer=AdamWMSAMScheduleFree(...))`` (HF Trainer, Accelerate,
    Lightning's DeepSpeedStrategy; ``zero_allow_untested_optimizer: true`` in its config) — or its
    ZeRO wrapper (``engine.optimizer``) when the engine is not at hand (the facade's
    :meth:`~DeepSpeedMSAMOptimizer.eval_state_dict` then needs the engine: it raises). An optimizer
    built without ``backend=DeepSpeedBackend()`` is switched to it here (before its first step).
    After it, ``train()``/``eval()``/``move_to_ascent()``/``move_from_ascent()`` called on the ZeRO
    wrapper, or on Accelerate's ``AcceleratedOptimizer`` around it, act on the engine's weights."""
    if isinstance(engine, wrapper_classes()):
        engine, zero = None, engine  # the ZeRO wrapper itself
    else:
        zero = getattr(engine, "optimizer", None)
        if zero is None or isinstance(zero, AdamWMSAMScheduleFree):
            raise TypeError(f"attach(engine): expected a DeepSpeedEngine with a ZeRO (stage 1-3) or bf16 optimizer, or "
                            f"that optimizer wrapper; got {type(engine).__name__} wrapping {type(zero).__name__}")
    ours = getattr(zero, "optimizer", None)
    facade = getattr(zero, "_msam_facade", None)
    if facade is not None:
        return facade
    if not isinstance(ours, AdamWMSAMScheduleFree):
        raise TypeError(f"attach(engine): the engine's optimizer does not wrap an AdamWMSAMScheduleFree "
                        f"(found {type(ours).__name__} inside {type(zero).__name__})")
    if not isinstance(ours.backend, DeepSpeedBackend):
        if _stepped_outside(ours, zero):
            raise RuntimeError("attach(engine): this AdamWMSAMScheduleFree has already stepped outside the engine; "
                               "attach it right after deepspeed.initialize")
        ours.bind_backend(DeepSpeedBackend())
    facade = DeepSpeedMSAMOptimizer(bind(engine, ours, zero))
    for name in ("train", "eval", "move_to_ascent", "move_from_ascent"):
        setattr(zero, name, getattr(facade, name))
    zero._msam_facade = facade
    return facade


# the ZeRO wrappers' fp32 master partitions: ZeRO-1/2, BF16_Optimizer, ZeRO-3 (ZeroDriver._masters reads the same)
_MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat")


def _stepped_outside(ours: AdamWMSAMScheduleFree, zero: Any) -> bool:
    """Whether ``ours`` holds state for tensors other than ``zero``'s fp32 master partitions: it
    stepped before ``deepspeed.initialize`` (its state is per model param, not per partition).
    State on the masters is the engine's own: ``engine.load_checkpoint`` before :func:`attach`
    (the HF Trainer resumes a DeepSpeed run before its callback attaches)."""
    masters = {id(t) for name in _MASTER_ATTRS for t in (getattr(zero, name, None) or ())}
    return any(id(p) not in masters for p, st in ours.state.items() if st)


def facade_of(optimizer: Any) -> Optional["DeepSpeedMSAMOptimizer"]:
    """The :class:`DeepSpeedMSAMOptimizer` found by following ``.optimizer`` from ``optimizer``
    (Accelerate's wrapper → the ZeRO wrapper), or None."""
    seen = 0
    while optimizer is not None and seen < 8:
        facade = getattr(optimizer, "_msam_facade", None)
        if isinstance(facade, DeepSpeedMSAMOptimizer):
            return facade
        if isinstance(optimizer, DeepSpeedMSAMOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


def find_optimizer(optimizer: Any, bind: bool = True, module: Any = None) -> Any:
    """Ours behind ``optimizer`` (Accelerate's or Lightning's wrapper, DeepSpeed's ZeRO wrapper): the
    :class:`~sharded_msam_sf.deepspeed.DeepSpeedMSAMOptimizer` facade under DeepSpeed (attaching the
    ZeRO wrapper first if ``bind`` and not yet attached), else the :class:`AdamWMSAMScheduleFree`;
    None if ``optimizer`` does not hold ours. ``module``: the model the engine wraps (the Trainer's
    ``model``), kept by a facade attached here for its ``eval_state_dict()``."""
    chain = []
    while optimizer is not None and len(chain) < 8:
        chain.append(optimizer)
        facade = getattr(optimizer, "_msam_facade", None)
        if facade is not None:
            return facade
        if isinstance(optimizer, AdamWMSAMScheduleFree):
            break
        optimizer = getattr(optimizer, "optimizer", None)
    if not isinstance(optimizer, AdamWMSAMScheduleFree):
        return None
    if len(chain) > 1 and "deepspeed" in sys.modules:
        if isinstance(chain[-2], wrapper_classes()):
            if not bind:
                return None
            facade = attach(chain[-2])
            if facade.module is None:
                facade.module = module
            return facade
    return optimizer


class DeepSpeedMSAMOptimizer:
    """Our optimizer's API on a DeepSpeed engine's weights.

    ``train()``, ``eval()``, ``move_to_ascent()`` and ``move_from_ascent()`` change
    the fp32 masters and push them to the bit16 weights ``engine.module`` computes
    with (an all-gather under ZeRO-1/2, a local copy plus the persistent-param gather
    under ZeRO-3). ``engine.step()`` is the step; ``step()`` here is an error.
    ``state_dict()``/``load_state_dict()`` are this rank's optimizer state (DeepSpeed's
    ``engine.save_checkpoint``/``load_checkpoint`` already include it).
    """

    def __init__(self, driver: ZeroDriver) -> None:
        self._driver = driver
        self.engine = driver.engine
        self.optimizer = driver.optimizer
        #: the module the engine computes with (``engine.module``; None if attached without the engine)
        self.module = getattr(driver.engine, "module", None)

    # ------------------------------------------------------------------ properties
    @property
    def zero_optimizer(self) -> Any:
        """DeepSpeed's wrapper (``engine.optimizer``)."""
        return self._driver.zero

    @property
    def kind(self) -> str:
        """``"zero12"``, ``"zero3"`` or ``"bf16"`` (DeepSpeed's BF16_Optimizer, ZeRO-1 + fp32 grad accumulation)."""
        return self._driver.kind

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def sam_mode(self) -> str:
        return self.optimizer.sam_mode

    @property
    def skipped_steps(self) -> int:
        return self.optimizer.skipped_steps

    @property
    def train_mode(self) -> bool:
        return all(g["train_mode"] for g in self.optimizer.param_groups)

    def __repr__(self) -> str:
        return f"DeepSpeedMSAMOptimizer({self.kind}, {self.optimizer.__class__.__name__}, sam_mode={self.sam_mode!r})"

    # ------------------------------------------------------------------ modes
    def train(self) -> None:
        """x → y (and the one_pass ascent), on the masters and the bit16 weights."""
        with self._driver.param_groups_filled():
            self.optimizer.train()

    def eval(self) -> None:
        """Remove the ascent, y → x: ``engine.module`` computes with the averaged weights."""
        with self._driver.param_groups_filled():
            self.optimizer.eval()

    def move_to_ascent(self) -> None:
        """two_pass: after ``engine.backward(loss)``, fold that gradient into m, drop it, and move
        the weights to ``y + ρ·m/||m||``. one_pass: the weights already sit at the ascent (no-op)."""
        opt = self.optimizer
        opt.require_train("move_to_ascent()")
        if opt.sam_mode == "one_pass":
            return
        if any(g["at_ascent"] for g in opt.param_groups):
            raise RuntimeError("move_to_ascent() was called twice: after it, run the second backward pass "
                               "(engine.backward(loss)), then call move_from_ascent() and engine.step()")
        self._driver.ascent()

    def move_from_ascent(self) -> None:
        """Remove the ascent: the weights return to y."""
        with self._driver.param_groups_filled():
            self.optimizer.move_from_ascent()

    def step(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("under DeepSpeed the step is engine.step(): it runs this optimizer inside the ZeRO step")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._driver.zero.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """This rank's optimizer state (its partitions' z, v, m and the per-group counters)."""
        with self._driver.param_groups_filled():
            return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load this rank's optimizer state; the masters are not changed (use engine.load_checkpoint
        for a full resume)."""
        with self._driver.param_groups_filled():
            self.optimizer.load_state_dict(state_dict)

    def eval_state_dict(self, rank0_only: bool = False) -> Optional[Dict[str, torch.Tensor]]:
        """The eval-mode (x) weights of ``engine.module`` as a full fp32 ``state_dict`` on the CPU:
        :func:`~sharded_msam_sf.deepspeed.full_fp32_state_dict` (the fp32 masters, not rounded
        to a bf16/fp16 model's dtype). Collective: every rank must call it. In train mode the
        optimizer is switched to eval for the export and back."""
        if self.module is None:
            raise RuntimeError("eval_state_dict(): this facade was attached to a ZeRO wrapper without its engine; "
                               "call attach(engine) with the DeepSpeedEngine, or set facade.module = engine.module")
        was_train = self.train_mode
        if was_train:
            self.eval()
        try:
            return full_fp32_state_dict(self.module, rank0_only=rank0_only)
        finally:
            if was_train:
                self.train()

    def save_eval_weights(self, path: Union[str, os.PathLike]) -> None:
        """Write :meth:`eval_state_dict` on rank 0 as the export directory ``path`` (``model.safetensors``
        + ``export.json``: :mod:`sharded_msam_sf.weights_io`; read back with ``load_weights(path)``);
        collective. ``python -m sharded_msam_sf.export`` writes the same file from a checkpoint."""
        from ..weights_io import save_weights
        sd = self.eval_state_dict(rank0_only=True)
        if sd is not None:
            save_weights(sd, path, {"weights": "x", "step": int(self.engine.global_steps)})
