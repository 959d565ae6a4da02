"""torchtitan (0.3): :class:`MSAMOptimizersContainer` builds :class:`~sharded_msam_sf.AdamWMSAMScheduleFree`
through torchtitan's optimizer extension point, and :func:`schedule_free_hooks` puts the model at x for its
checkpoints and validation.

- **One optimizer over all of this rank's model parts.** torchtitan builds one optimizer per model part
  (pipeline stage); ours needs the global ‖m‖ over every stage, so the container builds one
  ``AdamWMSAMScheduleFree`` whose param groups are those of every part (torchtitan's ``ParamGroupConfig``
  patterns, FQN-named), with ``pipeline_group=`` the pipeline process group: the stats all-reduce then spans
  all stages (one all-reduce per gradient evaluation). The group is ``pipeline_group=`` given to the
  constructor, else found on the params' DTensor device mesh (its root mesh's ``pipeline_mesh_dim``, "pp",
  when that dimension has more than one rank — the FSDP2 case), else none (no pipeline). A pipeline run
  without FSDP (plain tensors) must pass it.
- **The zero-lr state-init step**: torchtitan's ``state_dict()``/``load_state_dict()`` call
  ``init_optim_state``, a ``step()`` with zero gradients and lr = 0; ours creates its state there and does
  not count a step (``AdamWMSAMScheduleFree._is_state_init_call``), so a resumed run is not one step off.
- **x in checkpoints and validation**: the parameters hold y (one_pass: the ascent point) while training.
  :func:`schedule_free_hooks` wraps ``trainer.checkpointer.save`` (when a save is due), and
  ``trainer.validator.validate``, in ``eval()`` … ``train()``, and calls ``train()`` after
  ``trainer.checkpointer.load`` (a checkpoint holds x and the eval-mode counters). Without it torchtitan's
  checkpoints hold y / ỹ and the first step after a resume raises (eval mode).
- **Constant lr**: Schedule-Free needs no lr schedule (its warm-up is the optimizer's ``warmup_steps``):
  ``config.lr_scheduler = constant_lr()`` (torchtitan's ``warmup_steps=0, min_lr_factor=1.0``). Its
  default (200 warm-up steps, then a linear decay to 0 — ``decay_ratio=None`` decays right after the
  warm-up, measured) rescales the groups' lr every step.
- two_pass under torchtitan's ``train_step`` (one forward/backward per micro-batch) is not wired: use
  one_pass, or a ``train_step`` of your own around :func:`sharded_msam_sf.accumulation.two_pass_step`.

Use::

    from sharded_msam_sf.integrations.torchtitan import msam_optimizer, schedule_free_hooks
    config.optimizer = msam_optimizer(lr=2.5e-3, rho=1.0, warmup_steps=200)
    config.lr_scheduler = constant_lr()
    trainer = config.build(); schedule_free_hooks(trainer); trainer.train()

(docs/integrations.md gives the GPU launch.)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Dict, List

import torch.nn as nn

try:
    from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
except ImportError as e:  # pragma: no cover - the [torchtitan] extra
    raise ImportError("sharded_msam_sf.integrations.torchtitan needs torchtitan: pip install "
                      "'sharded_msam_sf[torchtitan]' (torchtitan>=0.3)") from e

from ..optimizer import AdamWMSAMScheduleFree

__all__ = ["MSAMOptimizersContainer", "msam_optimizer", "constant_lr", "schedule_free_hooks", "NAME"]

NAME = "AdamWMSAMScheduleFree"


def _pipeline_group_from_mesh(model_parts: List[nn.Module], dim: str) -> Any:
    """The process group of ``dim`` on the root device mesh of the first DTensor parameter, if it spans
    more than one rank (FSDP2 / TP params of a torchtitan model carry a sub-mesh of the world mesh)."""
    from torch.distributed.tensor import DTensor
    for part in model_parts:
        for p in part.parameters():
            if isinstance(p, DTensor):
                mesh = p.device_mesh
                root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
                names = root.mesh_dim_names or ()
                if dim in names and root[dim].size() > 1:
                    return root[dim].get_group()
                return None
    return None


class MSAMOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` holding one :class:`~sharded_msam_sf.AdamWMSAMScheduleFree` over
    all of this rank's model parts (see the module docstring). Every ``ParamGroupConfig`` must name
    ``optimizer_name="AdamWMSAMScheduleFree"``; its ``optimizer_kwargs`` are the group's hyperparameters
    (one ``sam_mode`` for all). ``Config.implementation`` ("fused" by default in torchtitan) is not
    passed on: ours picks its kernels itself (``fused=``/``foreach=`` in ``optimizer_kwargs`` to choose)."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pipeline_mesh_dim: str = "pp"
        """The device-mesh dimension of the pipeline stages, to find the pipeline group on the params' mesh."""

    def __init__(self, config: "MSAMOptimizersContainer.Config", *, model_parts: List[nn.Module],
                 pipeline_group: Any = None) -> None:
        self.model_parts = model_parts
        groups: List[Dict[str, Any]] = []
        for model in model_parts:
            by_name, _patterns = self._build_param_groups(model, config.param_groups, {})
            others = sorted(set(by_name) - {NAME})
            if others:
                raise ValueError(f"MSAMOptimizersContainer: every ParamGroupConfig must use optimizer_name="
                                 f"{NAME!r}, got {others} (the global ‖m‖ spans all parameters in one optimizer); "
                                 f"use torchtitan's OptimizersContainer for other optimizers")
            groups.extend(by_name.get(NAME, []))
        if pipeline_group is None:
            pipeline_group = _pipeline_group_from_mesh(model_parts, config.pipeline_mesh_dim)
        kwargs = dict(config.optimizer_factory_kwargs_by_name.get(NAME, {}))
        if pipeline_group is not None:
            kwargs["pipeline_group"] = pipeline_group
        self.optimizer = AdamWMSAMScheduleFree(groups, **kwargs)
        self.optimizers = [self.optimizer]
        all_params = [p for g in groups for p in g["params"]]
        self._validate_params(all_params)
        self._post_init(all_params)

    def _post_init(self, all_params: List[nn.Parameter]) -> None:
        super()._post_init(all_params)
        # Optimizer.__init__ above gave the container a param_groups of its own; torchtitan's lr scheduler and
        # metrics read the container's, so they are the optimizer's (one list: an lr change reaches ours)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    # -- Schedule-Free modes
    def train(self) -> None:
        """Params to y (one_pass: plus the ascent) for training."""
        self.optimizer.train()

    def eval(self) -> None:
        """Params to x, for validation and saving."""
        self.optimizer.eval()

    @property
    def sam_mode(self) -> str:
        return self.optimizer.sam_mode

    def move_to_ascent(self) -> None:
        self.optimizer.move_to_ascent()

    def move_from_ascent(self) -> None:
        self.optimizer.move_from_ascent()


def msam_optimizer(**optimizer_kwargs: Any) -> MSAMOptimizersContainer.Config:
    """A :class:`MSAMOptimizersContainer.Config` with one catch-all group (torchtitan's ``default_adamw``
    for ours): ``config.optimizer = msam_optimizer(lr=2.5e-3, rho=1.0, warmup_steps=200)``."""
    return MSAMOptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name=NAME, optimizer_kwargs=dict(optimizer_kwargs))])


def constant_lr() -> Any:
    """torchtitan's ``LRSchedulersContainer.Config`` that leaves the lr constant (no warm-up, decay factor 1)."""
    from torchtitan.components.optimizer import LRSchedulersContainer
    return LRSchedulersContainer.Config(warmup_steps=0, min_lr_factor=1.0)


def _container(trainer: Any) -> MSAMOptimizersContainer:
    opt = getattr(trainer, "optimizers", None)
    if not isinstance(opt, MSAMOptimizersContainer):
        raise TypeError(f"schedule_free_hooks: trainer.optimizers is {type(opt).__name__}, not MSAMOptimizersContainer "
                        f"(set config.optimizer = msam_optimizer(...) or MSAMOptimizersContainer.Config(...))")
    return opt


def schedule_free_hooks(trainer: Any) -> Any:
    """Wrap ``trainer.checkpointer.save`` (only when a save is due: ``checkpointer._should_save``),
    ``trainer.validator.validate`` (if the trainer has a validator) in ``eval()`` … ``train()``, and
    ``trainer.checkpointer.load`` with ``train()`` after it; then ``train()``. Returns ``trainer``."""
    opt = _container(trainer)
    ck = getattr(trainer, "checkpointer", None)
    if ck is not None:
        save, load = ck.save, ck.load
        should_save = getattr(ck, "_should_save", None)

        @functools.wraps(save)
        def save_at_x(curr_step: int, last_step: bool = False, *args: Any, **kwargs: Any) -> Any:
            due = should_save(curr_step, last_step) if callable(should_save) else True
            if not due:
                return save(curr_step, last_step, *args, **kwargs)
            opt.eval()
            try:
                return save(curr_step, last_step, *args, **kwargs)
            finally:
                opt.train()

        @functools.wraps(load)
        def load_then_train(*args: Any, **kwargs: Any) -> Any:
            out = load(*args, **kwargs)
            opt.train()  # the checkpoint holds x and eval mode
            return out
        ck.save, ck.load = save_at_x, load_then_train
    validator = getattr(trainer, "validator", None)
    if validator is not None and callable(getattr(validator, "validate", None)):
        validate = validator.validate

        @functools.wraps(validate)
        def validate_at_x(*args: Any, **kwargs: Any) -> Any:
            opt.eval()
            try:
                return validate(*args, **kwargs)
            finally:
                opt.train()
        validator.validate = validate_at_x
    opt.train()
    return trainer

