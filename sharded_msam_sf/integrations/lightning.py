"""Lightning: :class:`ScheduleFreeCallback` puts the optimizer in the right mode for each stage.

Schedule-Free keeps the params at y (plus the MSAM ascent in one_pass) while training and at
the averaged x for evaluation and for saving; Lightning knows neither, so this callback calls
``optimizer.train()`` / ``optimizer.eval()`` on every optimizer of the trainer that has them:

============================================  ===========================================
Lightning hook                                mode
============================================  ===========================================
``on_train_batch_start``                      ``train()`` (y; a no-op when already there)
``on_validation_start``, ``on_test_start``,   ``eval()`` (x)
``on_predict_start``, ``on_fit_end``
``on_save_checkpoint`` (ModelCheckpoint and   ``eval()``, then the checkpoint's
``trainer.save_checkpoint``)                  ``state_dict`` and ``optimizer_states`` are
                                              taken again, so both hold x and the
                                              optimizer's eval-mode counters
============================================  ===========================================

``ScheduleFreeCallback(recalibrate_bn=N)`` (default 0: off) also re-estimates the BatchNorm running
statistics at x (:func:`sharded_msam_sf.bn.recalibrate`, combined over the data-parallel ranks) on the
first N batches of ``trainer.train_dataloader`` at ``on_validation_start`` (not in the sanity check) and
``on_save_checkpoint``, once per global step, so validation and every checkpoint see statistics that
belong to x; ``recalibrate_forward(module, batch)`` overrides the default ``module(batch[0])``.

Training is switched back on lazily (the next training batch), not at the end of validation:
Lightning runs ModelCheckpoint after the other callbacks, so a ``train()`` there would save y.
Resuming from such a checkpoint loads x and eval mode, and the next training batch's
``train()`` gives the same y as the uninterrupted run, bit for bit.

Automatic optimization works in both modes (two_pass: ``optimizer.step(closure)`` runs the SAM
loop, see :meth:`~sharded_msam_sf.AdamWMSAMScheduleFree.step`). two_pass with
``accumulate_grad_batches > 1``: the callback keeps the step's earlier micro-batches and the optimizer
runs them again at the ascent point before the last one's closure
(:meth:`~sharded_msam_sf.AdamWMSAMScheduleFree.set_closure_replay`), so g0 and g are each the mean over
all the step's micro-batches, each pass syncing once under DDP. ``gradient_clip_val`` clips g, the
gradient the update uses, never g0 (held off for the first closure call). Manual optimization: call ``move_to_ascent()`` etc. in ``training_step`` as in
a plain loop. Strategies: single device, DDP, and DeepSpeed (one_pass under automatic
optimization, both modes under manual optimization; the callback attaches the engine's ZeRO
optimizer at fit start if :func:`sharded_msam_sf.deepspeed.register` did not). Lightning runs
``DeepSpeedStrategy`` on CUDA only; see docs/integrations.md for what was tested on the CPU.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

try:
    from lightning.pytorch import Callback
except ImportError as e:  # pragma: no cover - the [lightning] extra
    raise ImportError("sharded_msam_sf.integrations.lightning needs Lightning: pip install "
                      "'sharded_msam_sf[lightning]' (lightning>=2.4)") from e

from ..bn import recalibrate
from ..deepspeed import DeepSpeedMSAMOptimizer, find_optimizer

__all__ = ["ScheduleFreeCallback"]


def _schedule_free(trainer: Any) -> List[Any]:
    """The trainer's optimizers that have ``train()``/``eval()``: ours (under ``DeepSpeedStrategy`` the
    :class:`~sharded_msam_sf.deepspeed.DeepSpeedMSAMOptimizer` of the engine's ZeRO wrapper, attached
    here if ``register()`` did not), or any other Schedule-Free one."""
    out = []
    for opt in trainer.optimizers:
        ours = find_optimizer(opt, module=trainer.lightning_module)
        if ours is not None:
            out.append(ours)
            continue
        opt = getattr(opt, "optimizer", opt) if type(opt).__name__.startswith("Lightning") else opt
        if callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None)):
            out.append(opt)
    return out


def _in_train_mode(opt: Any) -> bool:
    return any(g.get("train_mode", False) for g in opt.param_groups)


class ScheduleFreeCallback(Callback):
    """``train()`` for training, ``eval()`` for validation, test, predict, checkpoints and the end of fit.

    Args:
        recalibrate_bn: batches per rank for re-estimating BatchNorm statistics at x before every
            validation and checkpoint (0: never).
        recalibrate_forward: ``forward(module, batch)`` for those passes (default ``module(batch[0])`` for a
            tuple/list batch, ``module(**batch)`` for a dict, ``module(batch)`` otherwise).
    """

    def __init__(self, recalibrate_bn: int = 0, recalibrate_forward: Any = None) -> None:
        super().__init__()
        if isinstance(recalibrate_bn, bool) or not isinstance(recalibrate_bn, int) or recalibrate_bn < 0:
            raise ValueError(f"ScheduleFreeCallback: recalibrate_bn must be an int >= 0 (batches per rank; 0: off), "
                             f"got {recalibrate_bn!r}")
        self.recalibrate_bn = recalibrate_bn
        self.recalibrate_forward = recalibrate_forward
        self._calibrated_at: Optional[int] = None

    def _recalibrate(self, trainer: Any, pl_module: Any) -> bool:
        """With ``recalibrate_bn``: the statistics at x (every optimizer is in eval mode now), once per step."""
        if not self.recalibrate_bn or trainer.sanity_checking or self._calibrated_at == trainer.global_step:
            return False
        loader = trainer.train_dataloader
        if loader is None:
            return False  # no training data loaded (validate()/test() outside fit): nothing to calibrate with
        recalibrate(pl_module, loader, self.recalibrate_bn, optimizer=None, forward=self.recalibrate_forward)
        self._calibrated_at = trainer.global_step
        return True

    def __init__(self) -> None:
        super().__init__()
        self._micro: List[Any] = []      # two_pass + accumulation: (batch, batch_idx) of the step so far
        self._ks: tuple = ()             # the optimizers' step counters at the batch's start
        self._held_clip: Any = None      # (gradient_clip_val,) while clipping is held off for g0

    def _train(self, trainer: Any) -> None:
        for opt in _schedule_free(trainer):
            opt.train()

    def _eval(self, trainer: Any) -> None:
        for opt in _schedule_free(trainer):
            opt.eval()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not _schedule_free(trainer):
            raise RuntimeError("ScheduleFreeCallback: the trainer has no optimizer with train()/eval() "
                               "(configure_optimizers should return AdamWMSAMScheduleFree)")
        for opt in _schedule_free(trainer):
            two_pass = getattr(opt, "sam_mode", None) == "two_pass" and any(g.get("rho", 0) > 0
                                                                             for g in opt.param_groups)
            if two_pass and pl_module.automatic_optimization and isinstance(opt, DeepSpeedMSAMOptimizer):
                raise ValueError(
                    "ScheduleFreeCallback: sam_mode='two_pass' under DeepSpeedStrategy with automatic optimization: "
                    "Lightning's step there is engine.step() after one backward pass, with no closure to run at the "
                    "ascent point. Use manual optimization (manual_backward, optimizer.move_to_ascent(), "
                    "manual_backward, optimizer.move_from_ascent(), step()) or sam_mode='one_pass'")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._train(trainer)
        self._in_batch = True
        self._ks = self._counters(self._two_pass_automatic(trainer, pl_module))
        if self._micro:  # two_pass, accumulate_grad_batches > 1: this step's earlier micro-batches
            for opt in self._two_pass_automatic(trainer, pl_module):
                opt.set_closure_replay(lambda t=trainer, m=pl_module, o=opt: self._replay(t, m, o))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._in_batch = False  # ModelCheckpoint (run after this callback) saves from here on
        self._restore_clipping(trainer)
        opts = self._two_pass_automatic(trainer, pl_module)
        if not opts or trainer.accumulate_grad_batches <= 1:
            return
        if self._counters(opts) == self._ks:
            self._micro.append((batch, batch_idx))  # no step yet: run again at the ascent point of the step
        else:
            self._micro = []
        for o in opts:
            o.set_closure_replay(None)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """two_pass, automatic optimization: Lightning clips (``gradient_clip_val``) after every closure
        call; the first one's gradient is g0, which is folded into m unclipped (ALGORITHM.md), so clipping
        is held off for that call and back on for the second (g, the gradient the update uses)."""
        ours = find_optimizer(optimizer, module=pl_module)
        if ours is None or ours not in self._two_pass_automatic(trainer, pl_module):
            return
        if not any(g["ascent_taken"] for g in ours.param_groups):  # the first pass: g0
            if self._held_clip is None and trainer.gradient_clip_val:
                self._held_clip = (trainer.gradient_clip_val,)
                trainer.gradient_clip_val = None
        else:
            self._restore_clipping(trainer)

    # two_pass with accumulation under automatic optimization: Lightning runs the closure of each earlier
    # micro-batch without a step (gradients accumulated, sync held back), then ``step(closure)`` on the last;
    # the optimizer keeps the accumulated gradients and calls :meth:`_replay` at the ascent point
    def _two_pass_automatic(self, trainer: Any, pl_module: Any) -> List[Any]:
        if not pl_module.automatic_optimization:
            return []
        return [o for o in _schedule_free(trainer) if getattr(o, "sam_mode", None) == "two_pass"
                and callable(getattr(o, "set_closure_replay", None))]

    @staticmethod
    def _counters(opts: List[Any]) -> tuple:
        """Steps taken and skipped: they change exactly when a step happened."""
        return tuple(g["k"] + g.get("skipped_steps", 0) for o in opts for g in o.param_groups)

    def _replay(self, trainer: Any, pl_module: Any, opt: Any) -> None:
        """The step's earlier micro-batches at the ascent point: forward through the strategy (DDP's
        wrapper), loss / accumulate_grad_batches as Lightning's closure divides it, backward with the
        gradient sync held back (the last micro-batch, in the closure, syncs)."""
        from lightning.pytorch.loops.utilities import _block_parallel_sync_behavior
        n = trainer.accumulate_grad_batches
        for batch, batch_idx in self._micro:
            with _block_parallel_sync_behavior(trainer.strategy, block=True):
                out = trainer.strategy.training_step(batch, batch_idx)
                loss = out["loss"] if isinstance(out, dict) else out
                trainer.strategy.backward(loss / n, opt)

    def _restore_clipping(self, trainer: Any) -> None:
        if self._held_clip is not None:
            trainer.gradient_clip_val = self._held_clip[0]
            self._held_clip = None

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval(trainer)
        if trainer.training or getattr(trainer.state, "fn", None) == "fit":
            self._recalibrate(trainer, pl_module)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval(trainer)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval(trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._eval(trainer)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        """Lightning took the state dicts before this hook: take them again in eval mode (x)."""
        if getattr(self, "_in_batch", False):
            raise RuntimeError(
                "ScheduleFreeCallback: trainer.save_checkpoint() inside training_step (or another hook of the "
                "training batch) is refused: the checkpoint must hold x, and moving the params to x there "
                "modifies tensors that autograd still needs (the backward pass would fail, or the step would "
                "start from x). Save from on_train_batch_end, or let ModelCheckpoint(every_n_train_steps=...) do it")
        opts = _schedule_free(trainer)
        moved = any(_in_train_mode(o) for o in opts)
        self._eval(trainer)
        if not (self._recalibrate(trainer, pl_module) or moved):
            return
        checkpoint["state_dict"] = trainer.strategy.lightning_module_state_dict()
        if "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = [trainer.strategy.optimizer_state(o) for o in trainer.optimizers]
