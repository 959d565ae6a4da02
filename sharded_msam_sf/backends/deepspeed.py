"""DeepSpeed ZeRO-1/2/3 (and the BF16_Optimizer path): the back end and the engine glue.

DeepSpeed owns the parameters: it hands our optimizer one flat fp32 partition per
param group (ZeRO-1/2, BF16_Optimizer) or per sub-group (ZeRO-3) and calls its
``step()`` group by group, copying each group's fp32 master into the bit16 weights
right after that group's call. Our one_pass step needs the global ``||m_new||`` over
*every* group before it writes any group's ``p = y + s·m``, so the group-by-group
calls are gathered into one: :class:`DeepSpeedDriver` replaces the ZeRO optimizer's
``_optimizer_step(i)`` (an internal of deepspeed 0.16–0.19, checked at install) with
one that only keeps group ``i``'s gradient partition until the last group's call;
there it runs the optimizer's own ``step()`` (or ``move_to_ascent()``) once over all
groups — stats of every group, one all-reduce of a few scalars, then the update —
and copies the earlier groups' masters into their bit16 partitions. DeepSpeed then
copies the last group and runs its usual all-gather (ZeRO-1/2) or nothing
(ZeRO-3, whose weights stay partitioned): the step adds one scalar all-reduce and no
second all-gather. The BF16_Optimizer already calls ``step()`` once for all groups.

Outside the step (``train()``, ``eval()``, ``move_*``) the optimizer changes the fp32
masters and calls :meth:`DeepSpeedBackend.params_changed`, which pushes them to the
bit16 weights the way DeepSpeed does after a checkpoint load: ZeRO-1/2 and BF16
``update_lp_params()`` (a copy and an all-gather), ZeRO-3 the copy into
``fp16_partitioned_groups_flat`` between ``checkpoint_event_prologue()`` and
``checkpoint_event_epilogue()`` (which re-gathers the persistent params).

The two_pass ascent (``move_to_ascent()``) runs through the ZeRO optimizer's own
``step()`` too, so that the first gradient is reduced, unscaled (fp16), checked for
overflow and clipped exactly like the second; the loss scaler's bookkeeping is put
back afterwards unless that pass overflowed.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .base import Backend

if TYPE_CHECKING:  # pragma: no cover
    from ..optimizer import AdamWMSAMScheduleFree

__all__ = ["DeepSpeedBackend", "DeepSpeedDriver"]


class DeepSpeedBackend(Backend):
    """Flat fp32 ZeRO partitions: local tensors as they are, the stats summed over the
    data-parallel group, out-of-step changes pushed to the bit16 weights by the driver."""

    name = "deepspeed"

    def __init__(self) -> None:
        self.group = None  # the ZeRO data-parallel process group, set by the driver
        self.driver: Optional["DeepSpeedDriver"] = None

    def all_reduce_(self, stats: Tensor) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)

    def params_changed(self) -> None:
        if self.driver is not None:
            self.driver.params_changed()

    def clear_grads(self, optimizer: "AdamWMSAMScheduleFree") -> None:
        # the gradients the optimizer sees are the fp32 partitions' .grad set by the driver;
        # DeepSpeed frees its own buffers in the step that runs move_to_ascent()
        optimizer.zero_grad(set_to_none=True)


def _kind(zero: Any) -> str:
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
        f"this engine wraps the optimizer in {type(zero).__name__}: set zero_optimization.stage to 1, 2 or 3")


class DeepSpeedDriver:
    """Couples :class:`AdamWMSAMScheduleFree` to a DeepSpeed engine's ZeRO optimizer."""

    _REQUIRED = {
        "zero12": ("_optimizer_step", "single_partition_of_fp32_groups", "parallel_partitioned_bit16_groups",
                   "bit16_groups", "real_dp_process_group", "update_lp_params", "_lazy_init_hp_params_optimizer_state"),
        "bf16": ("fp32_groups_flat_partition", "update_lp_params", "fp32_groups_gradient_flat_partition"),
        "zero3": ("_optimizer_step", "fp32_partitioned_groups_flat", "fp16_partitioned_groups_flat",
                  "sub_group_to_group_id", "fp16_groups", "_unflatten_partitioned_parameters",
                  "_set_fp32_optimizer_param_groups", "_clear_fp32_optimizer_param_groups",
                  "checkpoint_event_prologue", "checkpoint_event_epilogue", "_reassign_or_swap_out_partitioned_parameters"),
    }

    def __init__(self, engine: Any, optimizer: "AdamWMSAMScheduleFree") -> None:
        self.engine = engine
        self.optimizer = optimizer
        self.zero = engine.optimizer
        self.kind = _kind(self.zero)
        missing = [a for a in self._REQUIRED[self.kind] if not hasattr(self.zero, a)]
        if missing:
            raise NotImplementedError(f"this DeepSpeed version's {type(self.zero).__name__} lacks {missing}; "
                                      f"sharded_msam_sf.deepspeed is tested with deepspeed 0.16-0.19")
        if getattr(self.zero, "optimizer", None) is not optimizer:
            raise RuntimeError("the engine's ZeRO optimizer does not wrap our optimizer")
        if self.kind == "zero3" and getattr(self.zero, "swap_optimizer", False):
            raise NotImplementedError("ZeRO-3 NVMe optimizer swapping is not supported by AdamWMSAMScheduleFree")
        backend = optimizer.backend
        if not isinstance(backend, DeepSpeedBackend):
            raise TypeError("the optimizer must be built with backend=DeepSpeedBackend()")
        backend.group = self.zero.dp_process_group
        backend.driver = self
        self.in_step = False  # inside a ZeRO step: DeepSpeed copies and gathers itself
        self.action = "step"  # what the gathered call runs: "step" or "ascent"
        self._pending: Dict[int, Optional[Tensor]] = {}
        self._install()

    # ------------------------------------------------------------------ install
    def _install(self) -> None:
        zero = self.zero
        original_step = zero.step

        def step(*args, **kwargs):
            self.in_step = True
            self._pending = {}
            self._ran = False
            if self.kind == "bf16":  # BF16_Optimizer.step() calls optimizer.step() once for all groups
                self.optimizer.step = self._run_action
            try:
                out = original_step(*args, **kwargs)
                if not self._ran and getattr(zero, "overflow", False):
                    self._skip_with_nonfinite()
                return out
            finally:
                if self.kind == "bf16":
                    del self.optimizer.step
                self.in_step = False
                self._pending = {}

        zero.step = step
        if self.kind == "zero12":
            zero._optimizer_step = self._zero12_optimizer_step
        elif self.kind == "zero3":
            zero._optimizer_step = self._zero3_optimizer_step

    def _run_action(self) -> None:
        self._ran = True
        opt = self.optimizer
        skipped = opt.skipped_steps
        if self.action == "ascent":
            opt.move_to_ascent()
        else:
            type(opt).step(opt)
        if self.optimizer.skipped_steps > skipped and self.action == "step":
            # the optimizer skipped (a non-finite gradient, or a pending skip from an overflowed
            # ascent pass): the engine reads .overflow after step() and reports the step as skipped
            self.zero.overflow = True

    # ZeRO-1/2: DeepSpeed calls _optimizer_step(i) for i = 0..G-1 with group i's grad set
    def _zero12_optimizer_step(self, group_no: int) -> None:
        zero = self.zero
        fp32 = zero.single_partition_of_fp32_groups
        self._pending[group_no] = fp32[group_no].grad
        if len(self._pending) < len(zero.bit16_groups):
            return  # the update waits for the last group's gradient
        for i, grad in self._pending.items():
            fp32[i].grad = grad
        try:
            self._run_action()
        finally:
            for i in range(len(fp32)):
                fp32[i].grad = None
        last = max(self._pending)
        with torch.no_grad():
            for i in range(len(fp32)):
                if i == last:
                    continue  # DeepSpeed copies the group of the current call itself
                pid = dist.get_rank(group=zero.real_dp_process_group[i])
                zero.parallel_partitioned_bit16_groups[i][pid].data.copy_(fp32[i].data)
        fp32[last].grad = self._pending[last]  # DeepSpeed drops it after this call returns
        self._pending = {}
        zero._lazy_init_hp_params_optimizer_state()

    # ZeRO-3: DeepSpeed calls _optimizer_step(s) per sub-group s, params set only during the call
    def _zero3_optimizer_step(self, sub_group_id: int) -> None:
        zero = self.zero
        fp32 = zero.fp32_partitioned_groups_flat
        self._pending[sub_group_id] = fp32[sub_group_id].grad
        if len(self._pending) < len(zero.fp16_groups):
            return
        for s, grad in self._pending.items():
            fp32[s].grad = grad
        last = max(self._pending)
        with self.param_groups_filled():
            try:
                self._run_action()
            finally:
                for s in range(len(fp32)):
                    if s != last:
                        fp32[s].grad = None
        with torch.no_grad():
            for s in range(len(fp32)):
                if s != last:
                    zero._reassign_or_swap_out_partitioned_parameters(s)
        self._pending = {}

    # ------------------------------------------------------------------ groups and pushes
    @contextlib.contextmanager
    def param_groups_filled(self) -> Iterator[None]:
        """ZeRO-3 empties ``param_groups[i]['params']`` between steps; fill them for a call."""
        if self.kind != "zero3" or any(g["params"] for g in self.optimizer.param_groups):
            yield
            return
        self.zero._set_fp32_optimizer_param_groups()
        try:
            yield
        finally:
            self.zero._clear_fp32_optimizer_param_groups()

    def params_changed(self) -> None:
        if not self.in_step:
            self.push()

    @torch.no_grad()
    def push(self) -> None:
        """Copy the fp32 masters into the bit16 weights that ``engine.module`` computes with."""
        zero = self.zero
        if self.kind in ("zero12", "bf16"):
            zero.update_lp_params()
            return
        zero.checkpoint_event_prologue()
        for s in range(len(zero.fp32_partitioned_groups_flat)):
            zero._reassign_or_swap_out_partitioned_parameters(s)
        zero.checkpoint_event_epilogue()

    # ------------------------------------------------------------------ two_pass ascent
    def ascent(self) -> None:
        """Run ``move_to_ascent()`` through the ZeRO optimizer's step (gradient reduction,
        unscaling, overflow check and clipping as for a step), keeping the loss scaler as it was."""
        zero = self.zero
        scaler = getattr(zero, "loss_scaler", None)
        saved = copy.copy(scaler.__dict__) if scaler is not None else None
        self.action = "ascent"
        try:
            zero.step()
        finally:
            self.action = "step"
        if not bool(getattr(zero, "overflow", False)) and saved is not None:
            scaler.__dict__.update(saved)  # a clean first pass leaves the loss scaler as it was
        zero.zero_grad(set_to_none=True)

    def _skip_with_nonfinite(self) -> None:
        """DeepSpeed found a non-finite gradient and returned before the optimizer saw it: hand the
        optimizer a non-finite gradient so that its own rule applies to the state and the ascent
        (one_pass: nothing changes; two_pass step: the ascent is removed; move_to_ascent: no
        ascent and the coming step is skipped). Costs one scalar all-reduce, on overflow only."""
        opt = self.optimizer
        # a two_pass step() removes an ascent the loop left in place: that change must reach the weights
        push = self.action == "step" and opt.sam_mode == "two_pass" and any(g["at_ascent"] for g in opt.param_groups)
        if push:
            self.in_step = False
        with self.param_groups_filled():
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            for p in params:
                p.grad = torch.full((), float("nan"), device=p.device, dtype=p.dtype).expand_as(p)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    self._run_action()
            finally:
                for p in params:
                    p.grad = None

    # ------------------------------------------------------------------ helpers
    def fp32_partitions(self) -> List[Tensor]:
        zero = self.zero
        if self.kind == "zero12":
            return list(zero.single_partition_of_fp32_groups)
        if self.kind == "bf16":
            return list(zero.fp32_groups_flat_partition)
        return list(zero.fp32_partitioned_groups_flat)
