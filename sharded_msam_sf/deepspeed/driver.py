"""DeepSpeed ZeRO-1/2/3 (and the BF16_Optimizer path): the driver that couples the optimizer to the engine,
and every DeepSpeed internal we use.

DeepSpeed owns the parameters: it hands our optimizer one flat fp32 partition per
param group (ZeRO-1/2, BF16_Optimizer) or per sub-group (ZeRO-3) and calls its
``step()`` group by group, copying each group's fp32 master into the bit16 weights
right after that group's call. Our one_pass step needs the global ``||m_new||`` over
*every* group before it writes any group's ``p = y + s·m``, so :class:`ZeroDriver`
gathers the group-by-group calls into one: it keeps each group's gradient partition
until the last group's call, and there runs the optimizer's own ``step()`` (or
``move_to_ascent()``) once over all groups — stats of every group, one all-reduce of
a few scalars, then the update — and copies the earlier groups' masters into their
bit16 partitions. DeepSpeed then copies the last group and runs its usual all-gather
(ZeRO-1/2) or nothing (ZeRO-3, whose weights stay partitioned): the step adds one
scalar all-reduce and no second all-gather. The BF16_Optimizer already calls
``step()`` once for all groups.

Outside the step (``train()``, ``eval()``, ``move_*``) the optimizer changes the fp32
masters and calls :meth:`DeepSpeedBackend.params_changed`, which pushes them to the
bit16 weights the way DeepSpeed does after a checkpoint load.

A step that DeepSpeed skips before calling the optimizer (fp16 overflow, a non-finite
gradient norm) reaches it as ``optimizer.skip_step(reason)``. The two_pass ascent
(``move_to_ascent()``) runs through the ZeRO optimizer's own ``step()``, so that the
first gradient is reduced, unscaled (fp16), checked for overflow and clipped exactly
like the second; a clean first pass leaves the loss scaler as it was.

**The DeepSpeed internals this uses** (deepspeed 0.16–0.19; ``ZeroDriver._REQUIRED`` checks
them when binding). None has a public seam: DeepSpeed's engine has no callback around or
inside the optimizer step, and its ZeRO wrappers are not ``torch.optim`` optimizers (no step
hooks).

- ``DeepSpeedZeroOptimizer.step``, ``DeepSpeedZeroOptimizer_Stage3.step``,
  ``BF16_Optimizer.step`` — *wrapped* (an instance attribute, set once by :func:`bind`):
  DeepSpeed's step runs unchanged inside. Around it we (a) let DeepSpeed copy fp32 → bit16
  and all-gather instead of pushing ourselves, (b) call ``optimizer.skip_step()`` when it
  returned early on overflow, before calling the client optimizer, (c) set its ``.overflow``
  when our optimizer skipped, which the engine reads for ``was_step_applied()`` and
  ``skipped_steps``.
- ``DeepSpeedZeroOptimizer._optimizer_step(i)`` (ZeRO-1/2) and
  ``DeepSpeedZeroOptimizer_Stage3._optimizer_step(s)`` — *replaced*: the per-(sub-)group
  client call inside ``step()``'s loop. Ours keeps the gradient until the last group and
  then runs one gathered call (which also does the ``_lazy_init_hp_params_optimizer_state()``
  link of ZeRO-1/2's original).
- ``BF16_Optimizer.optimizer`` — *swapped* during a two_pass :meth:`ZeroDriver.ascent` only:
  its ``step()`` calls ``self.optimizer.step()``; a stand-in whose ``step()`` is the gathered
  ``move_to_ascent()`` takes our optimizer's place for that call.
- ``.loss_scaler`` — copied before the ascent pass and put back after a clean one, by
  assignment, as DeepSpeed's own checkpoint load does (``state_dict['loss_scaler']``).
- Read and written, the masters and the bit16 weights: ZeRO-1/2
  ``single_partition_of_fp32_groups``, ``parallel_partitioned_bit16_groups``,
  ``real_dp_process_group``, ``bit16_groups``; BF16 ``fp32_groups_flat_partition``; ZeRO-3
  ``fp32_partitioned_groups_flat``, ``fp16_groups``.
- The push of the masters to the weights out of the step: ZeRO-1/2 and BF16
  ``update_lp_params()`` (DeepSpeed's own, after a universal checkpoint load); ZeRO-3 as its
  checkpoint load does, ``checkpoint_event_prologue()``,
  ``_reassign_or_swap_out_partitioned_parameters(s)``, ``checkpoint_event_epilogue()``.
- Tensor/pipeline parallelism (:mod:`.parallel`): read, the engine's (or the ZeRO wrapper's)
  ``mpu`` (a PipelineEngine's grid), each bit16 param's ``_hp_mapping.get_hp_fragment_address()``
  (ZeRO-1/2, BF16: ``bit16_groups`` / ``bf16_groups``), ZeRO-3 ``p.partition_numel()``, and
  ``PipelineModule.tied_comms``; :class:`DeepSpeedBackend` then reduces over the world, weighted.
- ZeRO-3 alignment padding (:func:`zero3_padding`): read, each param's ``partition_numel()``,
  ``ds_numel`` and ``ds_process_group``; DeepSpeed leaves the padding of its partitions
  uninitialised, and :meth:`ZeroDriver.clear_padding` zeros it in the fp32 masters when binding.
- ZeRO-3 empties ``param_groups[i]['params']`` between steps: they are filled for a call
  out of the step with ``_set_fp32_optimizer_param_groups()`` /
  ``_clear_fp32_optimizer_param_groups()``, as its ``state_dict()`` does.

- Stepped by a ZeRO wrapper it is not bound to (an engine built with ``optimizer=`` ours and no
  :func:`~sharded_msam_sf.deepspeed.attach`), the optimizer's ``step()`` asks
  :func:`~sharded_msam_sf.backends.zero.unbound_zero_wrapper`, which looks up the Python stack for a ``step``/``_optimizer_step``
  frame whose ``self`` is one of DeepSpeed's wrappers (``DeepSpeedZeroOptimizer``,
  ``DeepSpeedZeroOptimizer_Stage3``, ``BF16_Optimizer``, ``FP16_Optimizer``,
  ``FP16_UnfusedOptimizer``) holding this optimizer as ``.optimizer``; found, the step raises.
  Only when ``deepspeed`` is imported and the optimizer is not bound.
- :func:`~sharded_msam_sf.deepspeed.register` *replaces* three ``DeepSpeedEngine`` methods (class
  attributes, put back by ``unregister()``), each calling DeepSpeed's original for anything else:
  ``_is_supported_optimizer(name)`` (the engine's sanity check asserts on an optimizer type it
  does not know: ours is accepted), ``_configure_basic_optimizer(model_parameters)`` (builds
  ours from the config's optimizer section, validated, with ``zero_allow_untested_optimizer``
  set on the engine's ``_config`` and its ``_param_dict`` checked by
  :func:`~sharded_msam_sf.deepspeed.ds_config.check_deepspeed_config`) and
  ``_configure_optimizer(client_optimizer, model_parameters)`` (after DeepSpeed's, an
  ``AdamWMSAMScheduleFree`` inside ``engine.optimizer`` is attached). ``deepspeed.initialize``
  itself is not wrapped: Accelerate and others call it through their own references.
- :func:`~sharded_msam_sf.deepspeed.attach` sets ``train``, ``eval``, ``move_to_ascent`` and
  ``move_from_ascent`` as instance attributes of the ZeRO wrapper (``engine.optimizer``), so that
  Accelerate's ``AcceleratedOptimizer.train()/eval()`` (which call ``optimizer.train()`` on the
  wrapper they hold) reach the engine's weights; ``_msam_facade`` on the wrapper keeps the facade.

Beside it in this wing: :func:`~.weights.gathered` (the one ZeRO-3 gather helper) and
:func:`~.weights.full_fp32_state_dict` (the one weight export), :mod:`.facade` (attach, the facade),
:mod:`.register`, :mod:`.initialize`. Universal checkpoints (another world size or ZeRO stage, with z and every
group's counters): :func:`load_universal`, in :mod:`sharded_msam_sf.deepspeed.universal`, which
lists the DeepSpeed internals that load uses.
"""
from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends.base import Reduction
from ..backends.zero import DeepSpeedBackend, wrapper_kind
from .parallel import flat_pieces, parallel_layout, refuse_pipeline_two_pass

if TYPE_CHECKING:  # pragma: no cover
    from ..optimizer import AdamWMSAMScheduleFree

__all__ = ["ZeroDriver", "bind", "zero3_padding", "OVERFLOW_REASON"]

OVERFLOW_REASON = "DeepSpeed found a non-finite gradient (fp16: the loss scale drops) and skipped the step"


def bind(engine: Any, optimizer: "AdamWMSAMScheduleFree", zero: Any = None) -> "ZeroDriver":
    """The driver that couples ``optimizer`` to ``engine``'s ZeRO optimizer (or to ``zero``, a ZeRO
    wrapper whose engine is not at hand: ``engine`` may then be None), created on the first call
    (idempotent: the optimizer's back end keeps it)."""
    zero = engine.optimizer if zero is None else zero
    driver = getattr(optimizer.backend, "driver", None)
    if driver is None:
        return ZeroDriver(engine, optimizer, zero)
    if driver.zero is not zero:
        raise RuntimeError("this AdamWMSAMScheduleFree is already bound to another DeepSpeed engine")
    return driver


def use_model_parallel_layout(engine: Any, zero: Any, kind: str, backend: DeepSpeedBackend) -> None:
    """Tensor/pipeline parallel engine (:func:`~.parallel.parallel_layout` not None): the stats
    are summed over the world, each flat partition's pieces divided by their replica counts."""
    layout = parallel_layout(engine, zero)
    if layout is None:
        return
    backend.pieces = flat_pieces(engine, zero, kind, layout)
    backend.reduction = Reduction(layout.group, 1, None, weighted=True)


def zero3_padding(zero: Any) -> list:
    """``(flat, start, end)``: the element ranges of ZeRO-3's fp32 flat partitions that are alignment
    padding. A sub-group's flat is its params' partitions in order, ``n = p.partition_numel()``
    elements each, the param padded to ``n · world`` elements; rank ``r`` of the param's partition
    group holds elements ``[r·n, (r+1)·n)``, of which those at or past ``p.ds_numel`` are padding.
    DeepSpeed allocates each partition with ``torch.empty`` and copies only the param's elements in,
    so the padding (the end of the last ranks' partitions) holds whatever the memory held, NaN at
    times; its fp32 master is a copy of it."""
    out = []
    for params, flat in zip(zero.fp16_groups, zero.fp32_partitioned_groups_flat):
        at = 0
        for p in params:
            n = int(p.partition_numel())
            rank = dist.get_rank(group=getattr(p, "ds_process_group", zero.dp_process_group))
            valid = min(n, max(0, int(p.ds_numel) - rank * n))
            if valid < n:
                out.append((flat, at + valid, at + n))
            at += n
        if at != flat.numel():
            raise NotImplementedError(f"ZeRO-3: a sub-group's fp32 partition has {flat.numel()} elements, its "
                                      f"params' partitions {at}: this DeepSpeed version's layout is not supported")
    return out


class _AscentStandIn:
    """Our optimizer as BF16_Optimizer sees it during ``ZeroDriver.ascent()``: ``step()`` is the
    gathered ``move_to_ascent()``; everything else (state, param_groups) is the optimizer's."""

    def __init__(self, driver: "ZeroDriver") -> None:
        self._driver = driver

    def step(self, closure: Any = None) -> None:
        self._driver._gathered_call()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._driver.optimizer, name)


class ZeroDriver:
    """Couples :class:`AdamWMSAMScheduleFree` to a DeepSpeed engine's ZeRO optimizer (use :func:`bind`)."""

    _REQUIRED = {
        "zero12": ("_optimizer_step", "single_partition_of_fp32_groups", "parallel_partitioned_bit16_groups",
                   "bit16_groups", "real_dp_process_group", "update_lp_params", "_lazy_init_hp_params_optimizer_state"),
        "bf16": ("fp32_groups_flat_partition", "update_lp_params", "optimizer"),
        "zero3": ("_optimizer_step", "fp32_partitioned_groups_flat", "fp16_groups",
                  "_set_fp32_optimizer_param_groups", "_clear_fp32_optimizer_param_groups",
                  "checkpoint_event_prologue", "checkpoint_event_epilogue", "_reassign_or_swap_out_partitioned_parameters"),
    }

    def __init__(self, engine: Any, optimizer: "AdamWMSAMScheduleFree", zero: Any = None) -> None:
        self.engine = engine
        self.optimizer = optimizer
        self.zero = engine.optimizer if zero is None else zero
        self.kind = wrapper_kind(self.zero)
        required = ("step", "overflow", "dp_process_group", "zero_grad") + self._REQUIRED[self.kind]
        missing = [a for a in required if not hasattr(self.zero, a)]
        if missing:
            raise NotImplementedError(f"this DeepSpeed version's {type(self.zero).__name__} lacks {missing}; "
                                      f"sharded_msam_sf.deepspeed is tested with deepspeed 0.16-0.19")
        if getattr(self.zero, "optimizer", None) is not optimizer:
            raise RuntimeError("the engine's ZeRO optimizer does not wrap our optimizer")
        if self.kind == "zero3" and getattr(self.zero, "swap_optimizer", False):
            raise NotImplementedError("ZeRO-3 NVMe optimizer swapping is not supported by AdamWMSAMScheduleFree")
        backend = optimizer.backend
        if not isinstance(backend, DeepSpeedBackend):
            raise TypeError("the optimizer must be built with backend=DeepSpeedBackend() "
                            "(from sharded_msam_sf.backends.zero) to run inside a DeepSpeed engine")
        backend.group = self.zero.dp_process_group
        backend.driver = self
        refuse_pipeline_two_pass(engine, [optimizer.sam_mode])
        use_model_parallel_layout(engine, self.zero, self.kind, backend)
        self._in_step = False  # inside DeepSpeed's step, which copies fp32 → bit16 and all-gathers itself
        self._call = "step"  # what the gathered call runs: "step", or "move_to_ascent" during ascent()
        self._calls = 0  # gathered calls run so far (tells a step DeepSpeed skipped)
        self._pending: Dict[int, Optional[Tensor]] = {}  # (sub-)group -> its gradient partition
        self._deepspeed_step = self.zero.step
        self.zero.step = self._step
        self.clear_padding()
        if self.kind == "zero12":
            self.zero._optimizer_step = self._zero12_group_step
        elif self.kind == "zero3":
            self.zero._optimizer_step = self._zero3_group_step

    # ------------------------------------------------------------------ around DeepSpeed's step
    def _step(self, *args: Any, **kwargs: Any) -> Any:
        """Replaces ``zero.step``: DeepSpeed's step, then its skip decision handed to the optimizer."""
        opt, zero = self.optimizer, self.zero
        calls, skipped = self._calls, opt.skipped_steps
        self._pending = {}
        self._in_step = True
        try:
            out = self._deepspeed_step(*args, **kwargs)
        finally:
            self._in_step = False
            self._pending = {}
        ran = self._calls > calls or (self.kind == "bf16" and self._call == "step" and not zero.overflow)
        if not ran:
            if not zero.overflow:
                raise RuntimeError(f"{type(zero).__name__}.step() neither called the optimizer nor reported an "
                                   f"overflow: this DeepSpeed version is not supported by sharded_msam_sf")
            with self._gradients(self._masters()), self.param_groups_filled():
                opt.skip_step(OVERFLOW_REASON, ascent=self._call == "move_to_ascent")
        elif self._call == "step" and opt.skipped_steps > skipped:
            zero.overflow = True  # our optimizer skipped (a NaN it saw, or an overflowed ascent pass)
        return out

    def _gathered_call(self) -> None:
        self._calls += 1
        if self._call == "move_to_ascent":
            self.optimizer.move_to_ascent()
        else:
            self.optimizer.step()

    # ZeRO-1/2: DeepSpeed calls _optimizer_step(i) for i = 0..G-1, group i's gradient set just before
    def _zero12_group_step(self, group_no: int) -> None:
        zero = self.zero
        fp32 = self._masters()
        self._pending[group_no] = fp32[group_no].grad
        if len(self._pending) < len(zero.bit16_groups):
            return  # the update waits for the last group's gradient
        with self._gradients(fp32):
            self._gathered_call()
        with torch.no_grad():
            for i in range(len(fp32)):
                if i != group_no:  # DeepSpeed copies the group of the current call itself
                    pid = dist.get_rank(group=zero.real_dp_process_group[i])
                    zero.parallel_partitioned_bit16_groups[i][pid].data.copy_(fp32[i].data)
        zero._lazy_init_hp_params_optimizer_state()

    # ZeRO-3: DeepSpeed calls _optimizer_step(s) per sub-group s, param_groups filled only during the call
    def _zero3_group_step(self, sub_group_id: int) -> None:
        zero = self.zero
        fp32 = self._masters()
        self._pending[sub_group_id] = fp32[sub_group_id].grad
        if len(self._pending) < len(zero.fp16_groups):
            return
        with self._gradients(fp32), self.param_groups_filled():
            self._gathered_call()
        with torch.no_grad():
            for s in range(len(fp32)):
                if s != sub_group_id:  # DeepSpeed puts the current sub-group's weights in place itself
                    zero._reassign_or_swap_out_partitioned_parameters(s)

    @torch.no_grad()
    def clear_padding(self) -> None:
        """Zero the alignment padding of the fp32 masters and of the optimizer state made from them
        (:func:`zero3_padding`), so that z (a clone of the master), v and m hold zeros there. The
        padding stays zero: its gradient is zero (DeepSpeed's gradient buffer is zero-filled), so
        every update keeps it at 0. Called when binding."""
        if self.kind != "zero3":
            return  # ZeRO-1/2 and BF16 pad their flat groups with torch.zeros (align_dense_tensors)
        state = self.optimizer.state
        for flat, start, end in zero3_padding(self.zero):
            flat.data[start:end].zero_()
            for value in state.get(flat, {}).values():
                if isinstance(value, Tensor) and value.shape == flat.shape:
                    value[start:end].zero_()

    def _masters(self):
        """The fp32 master partitions, one per (sub-)group."""
        zero = self.zero
        if self.kind == "zero12":
            return zero.single_partition_of_fp32_groups
        if self.kind == "bf16":
            return zero.fp32_groups_flat_partition
        return zero.fp32_partitioned_groups_flat

    @contextlib.contextmanager
    def _gradients(self, masters) -> Iterator[None]:
        """Every (sub-)group's pending gradient on its master for the call inside; each ``.grad`` is
        then put back as DeepSpeed left it (None after its own call, or, under ZeRO-Offload, a
        buffer it reuses across steps; our optimizer drops the gradients it has used)."""
        found = [t.grad for t in masters]
        for i, grad in self._pending.items():
            masters[i].grad = grad
        try:
            yield
        finally:
            for t, grad in zip(masters, found):
                t.grad = grad
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
        if not self._in_step:
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
        unscaling, overflow check and clipping as for a step); a clean pass leaves the loss
        scaler as it was, so that it counts engine steps only."""
        zero = self.zero
        scaler = getattr(zero, "loss_scaler", None)
        saved = copy.deepcopy(scaler)
        self._call = "move_to_ascent"
        stand_in = self.kind == "bf16"
        if stand_in:
            zero.optimizer = _AscentStandIn(self)
        try:
            zero.step()
        finally:
            self._call = "step"
            if stand_in:
                zero.optimizer = self.optimizer
        if scaler is not None and not zero.overflow:
            zero.loss_scaler = saved
        zero.zero_grad(set_to_none=True)
