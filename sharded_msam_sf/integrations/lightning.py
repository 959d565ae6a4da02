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

Training is switched back on lazily (the next training batch), not at the end of validation:
Lightning runs ModelCheckpoint after the other callbacks, so a ``train()`` there would save y.
Resuming from such a checkpoint loads x and eval mode, and the next training batch's
``train()`` gives the same y as the uninterrupted run, bit for bit.

Automatic optimization works in both modes (two_pass: ``optimizer.step(closure)`` runs the SAM
loop, see :meth:`~sharded_msam_sf.AdamWMSAMScheduleFree.step`); two_pass with
``accumulate_grad_batches > 1`` is refused (a closure cannot re-run the earlier micro-batches at
the ascent point). Manual optimization: call ``move_to_ascent()`` etc. in ``training_step`` as in
a plain loop. Strategies: single device, DDP, and DeepSpeed (one_pass under automatic
optimization, both modes under manual optimization; the callback attaches the engine's ZeRO
optimizer at fit start if :func:`sharded_msam_sf.deepspeed.register` did not). Lightning runs
``DeepSpeedStrategy`` on CUDA only; see docs/integrations.md for what was tested on the CPU.
"""
from __future__ import annotations

from typing import Any, Dict, List

try:
    from lightning.pytorch import Callback
except ImportError as e:  # pragma: no cover - the [lightning] extra
    raise ImportError("sharded_msam_sf.integrations.lightning needs Lightning: pip install "
                      "'sharded_msam_sf[lightning]' (lightning>=2.4)") from e

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
    """``train()`` for training, ``eval()`` for validation, test, predict, checkpoints and the end of fit."""

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
            if two_pass and pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
                raise ValueError(
                    f"ScheduleFreeCallback: sam_mode='two_pass' with accumulate_grad_batches="
                    f"{trainer.accumulate_grad_batches} under automatic optimization: the closure cannot take "
                    "the earlier micro-batches' gradients at the ascent point. Use sam_mode='one_pass', "
                    "accumulate_grad_batches=1, or manual optimization")
            if two_pass and pl_module.automatic_optimization and isinstance(opt, DeepSpeedMSAMOptimizer):
                raise ValueError(
                    "ScheduleFreeCallback: sam_mode='two_pass' under DeepSpeedStrategy with automatic optimization: "
                    "Lightning's step there is engine.step() after one backward pass, with no closure to run at the "
                    "ascent point. Use manual optimization (manual_backward, optimizer.move_to_ascent(), "
                    "manual_backward, optimizer.move_from_ascent(), step()) or sam_mode='one_pass'")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._train(trainer)
        self._in_batch = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._in_batch = False  # ModelCheckpoint (run after this callback) saves from here on

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval(trainer)

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
        if not any(_in_train_mode(o) for o in opts):
            return
        self._eval(trainer)
        checkpoint["state_dict"] = trainer.strategy.lightning_module_state_dict()
        if "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = [trainer.strategy.optimizer_state(o) for o in trainer.optimizers]
