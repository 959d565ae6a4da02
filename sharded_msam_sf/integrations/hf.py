"""Hugging Face ``transformers.Trainer``: :class:`ScheduleFreeCallback` and :class:`MSAMTrainer`.

Schedule-Free keeps two points: training computes at y (one_pass: at the ascent point
``y + s·m``), and the weights to evaluate and keep are the average x. The Trainer already calls
``optimizer.train()`` in every ``training_step`` and ``optimizer.eval()`` in its evaluation loop;
:class:`ScheduleFreeCallback` adds what it misses:

- ``on_train_begin``: hooks ``model.state_dict()`` so that a save while the optimizer is in train mode
  (``trainer.save_model()`` from a callback, mid-training) holds x too (eval() around it);
  binds our optimizer inside a DeepSpeed engine (:func:`sharded_msam_sf.deepspeed.attach`
  of the ZeRO wrapper, if ``register()``/``attach()`` did not already) and calls ``train()``;
  refuses a Trainer whose optimizer is not ours (``Trainer(optimizers=(opt, None))`` with
  DeepSpeed: transformers drops ``opt`` and builds torch AdamW); warns when the lr scheduler is not
  constant (Schedule-Free needs none: ``lr_scheduler_type="constant"``; its warm-up is the
  optimizer's ``warmup_steps``).
- ``on_step_end`` and ``on_epoch_end``: ``eval()`` when a checkpoint is due (``control.should_save``),
  so that every checkpoint's model file holds x; ``on_save``: ``train()`` again.
- ``on_evaluate``: ``train()`` again (unless a save follows); ``on_train_end``: ``eval()``, so that
  ``trainer.save_model()``/``evaluate()``/``predict()`` after ``train()`` see x.
- ``recalibrate_bn=N`` (default 0: off): wherever an evaluation or a save follows (``on_step_end`` /
  ``on_epoch_end`` with ``control.should_evaluate`` or ``should_save``, and ``on_train_end``), the BatchNorm
  running statistics are re-estimated at x on the first N batches of the Trainer's train dataloader
  (:func:`sharded_msam_sf.bn.recalibrate`: exact pooled statistics, combined over the data-parallel ranks),
  so evaluation and every checkpoint's model file see statistics that belong to x. Training then goes
  on from them (BatchNorm's momentum average at y takes over again).

:class:`MSAMTrainer` is a ``Trainer`` that adds the callback and runs two_pass: its
``training_step`` takes the first backward pass, ``move_to_ascent()``, the second backward pass at
the ascent point, then ``move_from_ascent()`` (the Trainer then clips and steps). Under DeepSpeed,
Accelerate's backward also runs ``engine.step()``: the first pass runs ``engine.backward`` only,
and the engine's step after the second pass removes the ascent itself. With
``gradient_accumulation_steps > 1`` (not under DeepSpeed) the first pass runs over all the step's
micro-batches, then the second over the same micro-batches at the ascent point (g0 and g are each the
mean over them). Clipping (``max_grad_norm``) applies to g, the gradient the update uses; g0 is folded
into m unclipped. one_pass is the plain ``Trainer`` loop.

Routes (see docs/integrations.md): ``optimizer_cls_and_kwargs=(AdamWMSAMScheduleFree, kwargs)``
(one process, DDP, DeepSpeed), or under DeepSpeed the JSON optimizer section
``{"type": "AdamWMSAMScheduleFree", "params": {...}}`` after :func:`sharded_msam_sf.deepspeed.register`.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional

from transformers import Trainer, TrainerCallback

from ..bn import recalibrate
from ..deepspeed import find_optimizer

__all__ = ["ScheduleFreeCallback", "MSAMTrainer", "find_optimizer"]

DROPPED_OPTIMIZER = (
    "Trainer(optimizers=(AdamWMSAMScheduleFree(...), ...)) with DeepSpeed: transformers drops that optimizer and "
    "builds its own (torch AdamW). Pass optimizer_cls_and_kwargs=(AdamWMSAMScheduleFree, kwargs) instead, or name "
    "it in the DeepSpeed JSON (\"optimizer\": {\"type\": \"AdamWMSAMScheduleFree\", \"params\": {...}}) after "
    "sharded_msam_sf.deepspeed.register()")


def _deepspeed_enabled(args: Any) -> bool:
    return bool(getattr(args, "deepspeed", None) or getattr(args, "hf_deepspeed_config", None))


class ScheduleFreeCallback(TrainerCallback):
    """Keeps the Trainer's model at y for training and at x for evaluation, prediction and every save
    (see the module docstring). Add it with ``Trainer(..., callbacks=[ScheduleFreeCallback()])``.

    Args:
        recalibrate_bn: batches per rank for re-estimating BatchNorm statistics at x before every
            evaluation and save (0: never; see :func:`sharded_msam_sf.bn.recalibrate`).
        recalibrate_forward: ``forward(model, batch)`` for those passes (default ``model(**batch)``).
    """

    def __init__(self, recalibrate_bn: int = 0, recalibrate_forward: Any = None) -> None:
        if isinstance(recalibrate_bn, bool) or not isinstance(recalibrate_bn, int) or recalibrate_bn < 0:
            raise ValueError(f"ScheduleFreeCallback: recalibrate_bn must be an int >= 0 (batches per rank; 0: off), "
                             f"got {recalibrate_bn!r}")
        self._opt: Any = None
        self.recalibrate_bn = recalibrate_bn
        self.recalibrate_forward = recalibrate_forward
        self._calibrated_at: Optional[int] = None  # the global step whose x the statistics belong to

    # ------------------------------------------------------------------ helpers
    def _ours(self, optimizer: Any, model: Any = None) -> Any:
        ours = find_optimizer(optimizer, module=model)
        if ours is not None:
            self._opt = ours
        return self._opt

    def _mode(self, optimizer: Any, mode: str) -> None:
        ours = self._ours(optimizer)
        if ours is not None:
            getattr(ours, mode)()

    def _to_x(self, state: Any, optimizer: Any, model: Any, train_dataloader: Any) -> None:
        """``eval()``, and with ``recalibrate_bn`` the BatchNorm statistics at this x (once per step)."""
        self._mode(optimizer, "eval")
        ours = self._opt
        if not self.recalibrate_bn or ours is None or model is None or self._calibrated_at == state.global_step:
            return
        if train_dataloader is None:
            raise RuntimeError("ScheduleFreeCallback(recalibrate_bn=...): the Trainer passed no train_dataloader "
                               "to the callback")
        # Accelerate's DataLoaderShard registers each iterator with its GradientState (accumulation
        # boundaries of the training loop's own iterator): iterate the rank's underlying loader instead
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
        recalibrate(model, loader, self.recalibrate_bn, optimizer=ours, forward=self.recalibrate_forward)
        self._calibrated_at = state.global_step

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None and _deepspeed_enabled(args) and find_optimizer(optimizer, bind=False) is not None:
            raise ValueError(DROPPED_OPTIMIZER)

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        ours = self._ours(optimizer, model)
        if ours is None:
            raise TypeError(f"ScheduleFreeCallback: the Trainer's optimizer is {type(optimizer).__name__}, not "
                            f"AdamWMSAMScheduleFree (use Trainer(optimizer_cls_and_kwargs=(AdamWMSAMScheduleFree, "
                            f"kwargs)); under DeepSpeed this, or the JSON optimizer section after "
                            f"sharded_msam_sf.deepspeed.register())")
        kind = str(getattr(getattr(args, "lr_scheduler_type", None), "value", getattr(args, "lr_scheduler_type", "")))
        if kind != "constant":
            warnings.warn(f"ScheduleFreeCallback: lr_scheduler_type={kind!r} changes the lr over training; "
                          f"Schedule-Free needs no schedule (its warm-up is the optimizer's warmup_steps): "
                          f"set lr_scheduler_type=\"constant\"", UserWarning, stacklevel=2)
        ours.train()
        self._hook_model_saves(model)

    def _hook_model_saves(self, model: Any) -> None:
        """``model.state_dict()`` while the optimizer is in train mode (``trainer.save_model()`` from a
        callback, mid-training) returns x: eval() before, a copy of the values, train() after (the
        values of a state dict share the params' storage, which train() changes back)."""
        if model is None or getattr(self, "_hooked", None) is model:
            return
        self._hooked = model

        def pre(module, prefix, keep_vars):
            opt = self._opt
            if opt is not None and opt.param_groups[0].get("train_mode"):
                opt.eval()
                self._restore = True

        def post(module, state_dict, prefix, local_metadata):
            if getattr(self, "_restore", False):
                self._restore = False
                for k, v in state_dict.items():
                    if hasattr(v, "clone"):
                        state_dict[k] = v.clone()
                self._opt.train()
        model.register_state_dict_pre_hook(pre)
        model.register_state_dict_post_hook(post)

    def on_step_end(self, args, state, control, optimizer=None, model=None, train_dataloader=None, **kwargs):
        if control.should_save or (self.recalibrate_bn and control.should_evaluate):
            self._to_x(state, optimizer, model, train_dataloader)  # the checkpoint's model file holds x

    def on_epoch_end(self, args, state, control, optimizer=None, model=None, train_dataloader=None, **kwargs):
        if control.should_save or (self.recalibrate_bn and control.should_evaluate):  # *_strategy="epoch"
            self._to_x(state, optimizer, model, train_dataloader)

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step < state.max_steps:
            self._mode(optimizer, "train")

    def on_evaluate(self, args, state, control, optimizer=None, **kwargs):
        if not control.should_save and state.global_step < state.max_steps and self._opt is not None:
            self._mode(optimizer, "train")

    def on_train_end(self, args, state, control, optimizer=None, model=None, train_dataloader=None, **kwargs):
        self._to_x(state, optimizer, model, train_dataloader)  # save_model()/evaluate() after train() see x


class MSAMTrainer(Trainer):
    """``transformers.Trainer`` with :class:`ScheduleFreeCallback` added and the two_pass loop in
    :meth:`training_step` (one_pass runs the Trainer's own step)."""

    def __init__(self, *args: Any, callbacks: Optional[list] = None, **kwargs: Any) -> None:
        callbacks = list(callbacks or [])
        if not any(isinstance(c, ScheduleFreeCallback) or c is ScheduleFreeCallback for c in callbacks):
            callbacks.append(ScheduleFreeCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        ours = find_optimizer(self.optimizer)
        if ours is None or ours.sam_mode != "two_pass":
            return super().training_step(model, inputs, num_items_in_batch)
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps) > 1:
            if wrapped is not None:
                raise ValueError(f"MSAMTrainer: two_pass under DeepSpeed needs gradient_accumulation_steps=1 (got "
                                 f"{self.args.gradient_accumulation_steps}); use sam_mode=\"one_pass\" with "
                                 "gradient accumulation")
            return self._two_pass_accumulated(model, inputs, num_items_in_batch, ours)
        if wrapped is not None:
            def first_backward(loss, sync_gradients=True, **kw):  # engine.backward without engine.step()
                wrapped.engine.set_gradient_accumulation_boundary(is_boundary=sync_gradients)
                wrapped.engine.backward(loss, **kw)
            wrapped.backward = first_backward
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            if wrapped is not None:
                del wrapped.backward
        ours.move_to_ascent()
        super().training_step(model, inputs, num_items_in_batch)  # at the ascent point (DeepSpeed: then steps)
        if wrapped is None:
            ours.move_from_ascent()
        return loss

    def _two_pass_accumulated(self, model, inputs, num_items_in_batch, ours):
        """two_pass over the step's n = ``current_gradient_accumulation_steps`` micro-batches
        (:mod:`sharded_msam_sf.accumulation`): each call takes its micro-batch's first backward at y (the
        Trainer holds back the gradient sync of all but the last); the last call then folds g0 (the mean
        over all n, unclipped) into m by ``move_to_ascent()``, runs the same n micro-batches again at the
        ascent point (sync held back for all but the last) and ``move_from_ascent()``; the Trainer then
        clips g and steps. Returns this micro-batch's first-pass loss."""
        micro = self.__dict__.setdefault("_msam_micro_batches", [])
        loss = super().training_step(model, inputs, num_items_in_batch)  # first pass, at y
        micro.append(inputs)
        if len(micro) < self.current_gradient_accumulation_steps:
            return loss
        self._msam_micro_batches = []
        ours.move_to_ascent()
        for i, earlier in enumerate(micro):  # second pass, at the ascent point
            with (self._msam_no_sync(model) if i < len(micro) - 1 else contextlib.nullcontext()):
                super().training_step(model, earlier, num_items_in_batch)
        ours.move_from_ascent()
        return loss

    def _msam_no_sync(self, model):
        """The Trainer's own choice of gradient-sync hold-back for a micro-batch that is not the last."""
        if getattr(self.accelerator.gradient_state, "plugin_kwargs", {}).get("sync_each_batch", False):
            return contextlib.nullcontext()
        defer = getattr(self, "_defer_fsdp_gradient_reduction", None)
        if defer is not None and getattr(self, "is_distributed_loading_by_transformers", False):
            from transformers.distributed.fsdp import is_fsdp_managed_module
            if is_fsdp_managed_module(self.model):
                return defer()
        return self.accelerator.no_sync(model=model)
