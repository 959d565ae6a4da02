"""Plug AdamWMSAMScheduleFree into DeepSpeed: :func:`initialize` (our optimizer named in the JSON
config), :func:`attach` (our optimizer in an engine built elsewhere), and the facade
:class:`DeepSpeedMSAMOptimizer`.

::

    from sharded_msam_sf.deepspeed import initialize
    engine, optimizer, _, _ = initialize(model=model, config="configs/deepspeed/zero2-cpu.json")
    optimizer.train()
    for x, y in data:                      # one_pass: DeepSpeed's loop, unchanged
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
    optimizer.eval()                       # engine.module now computes with the averaged x

The config is an ordinary DeepSpeed config whose optimizer section names ours::

    "optimizer": {"type": "AdamWMSAMScheduleFree",
                  "params": {"lr": 0.0025, "rho": 1.0, "sam_mode": "one_pass", "weight_decay": 0.1}}

That section is validated (:mod:`sharded_msam_sf.deepspeed.ds_config`: unknown keys and bad
values are :class:`~sharded_msam_sf.config.ConfigError`\\ s naming the key) and removed;
everything else goes to ``deepspeed.initialize`` untouched, with
``zero_allow_untested_optimizer`` set. The second element of the returned tuple is a
:class:`DeepSpeedMSAMOptimizer`: our API (``train``/``eval``/``move_to_ascent``/
``move_from_ascent``/``state_dict``) acting on the engine's weights; ``engine.step()``
stays the step. two_pass::

    loss = engine(x, y); engine.backward(loss)
    optimizer.move_to_ascent()
    loss2 = engine(x, y); engine.backward(loss2)
    optimizer.move_from_ascent()
    engine.step()

Checkpoints: ``engine.save_checkpoint``/``load_checkpoint`` at the same world size and ZeRO stage; at
another, convert with ``python -m sharded_msam_sf.checkpoint to-universal CKPT OUT`` and load with
:func:`load_universal` ``(engine, OUT)`` (ZeRO-1/2/3; docs/checkpoints.md).

An engine built by someone else around our optimizer (``deepspeed.initialize(...,
optimizer=AdamWMSAMScheduleFree(params))``: HF Trainer, Accelerate, Lightning)::

    optimizer = attach(engine)

or, before any engine is built, :func:`register`: then every ``deepspeed.initialize`` builds
ours from a config that names it, and attaches ours wherever it is the engine's optimizer.

How the optimizer is coupled to DeepSpeed's ZeRO optimizers (and every DeepSpeed internal
that takes): :mod:`sharded_msam_sf.deepspeed.driver`.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist

from ..backends.zero import DeepSpeedBackend, wrapper_classes
from ..config import ConfigError, grouping_from_config, is_our_optimizer, optimizer_kwargs_from_config
from ..hyperparams import DEFAULTS
from ..optimizer import AdamWMSAMScheduleFree
from .decay_groups import decay_groups
from .driver import ZeroDriver, bind
from .ds_config import check_deepspeed_config, client_config, load_deepspeed_config
from .parallel import refuse_pipeline_two_pass
from .universal import load_universal
from .weights import full_fp32_state_dict

__all__ = ["initialize", "attach", "register", "unregister", "registered", "facade_of", "find_optimizer",
           "init_distributed", "DeepSpeedMSAMOptimizer", "ConfigError", "load_universal"]



def init_distributed(dist_backend: Optional[str] = None, **kwargs: Any) -> None:
    """``deepspeed.init_distributed`` with the ranks and rendezvous of whichever launcher started us.

    :func:`sharded_msam_sf.launch_env.export` reads torchrun, the deepspeed launcher, mpirun
    (Open MPI, MPICH/Hydra, MVAPICH, PMIx) or srun, and sets RANK/WORLD_SIZE/LOCAL_RANK and
    MASTER_ADDR/MASTER_PORT (a MASTER_ADDR/PORT you set is kept; an MPI launch across nodes
    gets rank 0's address over mpi4py, as DeepSpeed's ``mpi_discovery`` does). No-op for the
    environment if a process group exists.
    """
    import deepspeed
    if not (dist.is_available() and dist.is_initialized()):
        from ..launch_env import export
        if "distributed_port" in kwargs:
            os.environ.setdefault("MASTER_PORT", str(kwargs["distributed_port"]))
        export()
    deepspeed.init_distributed(dist_backend=dist_backend, **kwargs)


def initialize(model: torch.nn.Module = None,
               model_parameters: Optional[Iterable[Any]] = None,
               config: Union[str, os.PathLike, Mapping[str, Any], None] = None,
               *,
               dist_backend: Optional[str] = None,
               **kwargs: Any):
    """``deepspeed.initialize`` with our optimizer named in the config.

    Returns DeepSpeed's ``(engine, optimizer, dataloader, lr_scheduler)``, where
    ``optimizer`` is a :class:`DeepSpeedMSAMOptimizer`. ``model_parameters`` (params or
    param-group dicts, default: the model's trainable params) become the optimizer's
    param groups (``"no_decay_bias_and_norm": true`` in the section's params: split into the HF
    Trainer's weight-decay groups, :mod:`sharded_msam_sf.deepspeed.decay_groups`). Other keyword arguments (``training_data``, ``lr_scheduler``,
    ``mpu``, ``collate_fn``, ...) go to ``deepspeed.initialize``. A config whose
    optimizer is not ours is handed to ``deepspeed.initialize`` as it is.
    """
    if config is None:
        config = kwargs.pop("config_params", None)
    if config is None:
        raise ConfigError("config: missing (a DeepSpeed JSON path or dict with an \"optimizer\" section)")
    if "optimizer" in kwargs and kwargs["optimizer"] is not None:
        raise ValueError("initialize() builds the optimizer from the config's optimizer section; "
                         "do not pass optimizer= (for an engine built with your optimizer, use attach(engine))")
    kwargs.pop("optimizer", None)
    if model is None:
        raise ValueError("initialize() needs model=")
    ds = load_deepspeed_config(config)
    section = ds.get("optimizer")
    if section is None:
        raise ConfigError('optimizer: missing (add "optimizer": {"type": "AdamWMSAMScheduleFree", "params": {...}})')
    if isinstance(section, Mapping) and "type" in section and not is_our_optimizer(section):
        import deepspeed  # someone else's optimizer: DeepSpeed's business
        init_distributed(dist_backend)
        return deepspeed.initialize(model=model, model_parameters=model_parameters, config=ds, **kwargs)
    opt_kwargs = optimizer_kwargs_from_config(section, grouping=True)
    refuse_pipeline_two_pass(model, [opt_kwargs.get("sam_mode", "one_pass")])
    check_deepspeed_config(ds, opt_kwargs.get("sam_mode", "one_pass"))

    import deepspeed
    init_distributed(dist_backend)
    params = list(model_parameters) if model_parameters is not None else \
        [p for p in model.parameters() if p.requires_grad]
    params = _grouped(section, model, params, opt_kwargs)
    optimizer = AdamWMSAMScheduleFree(params, **opt_kwargs, backend=DeepSpeedBackend())
    engine, _, dataloader, lr_scheduler = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, config=client_config(ds), **kwargs)
    return engine, attach(engine), dataloader, lr_scheduler


def _grouped(section: Mapping[str, Any], model: torch.nn.Module, params: Any, opt_kwargs: Dict[str, Any]) -> Any:
    """``params``, or with ``"no_decay_bias_and_norm": true`` the HF Trainer's two weight-decay groups
    (:func:`~sharded_msam_sf.deepspeed.decay_groups.decay_groups`; the section's weight_decay, and 0 for biases and norms)."""
    if not grouping_from_config(section)["no_decay_bias_and_norm"]:
        return params
    try:
        return decay_groups(model, params, opt_kwargs.get("weight_decay", DEFAULTS["weight_decay"]))
    except ValueError as e:
        raise ConfigError(f"optimizer.params.{e}") from None


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


# ---------------------------------------------------------------------- register()
_ORIGINALS: Dict[str, Any] = {}


def register() -> None:
    """Teach ``deepspeed.initialize`` our optimizer; idempotent (undo: :func:`unregister`).

    After it, a DeepSpeed config whose optimizer section is
    ``{"type": "AdamWMSAMScheduleFree", "params": {...}}`` builds ours (the section validated as
    :func:`initialize` does: bad keys and values are ConfigErrors naming them; the rest of the
    config checked by :func:`~sharded_msam_sf.deepspeed.ds_config.check_deepspeed_config`;
    ``"no_decay_bias_and_norm": true`` splits the engine's parameter list into the HF Trainer's two
    weight-decay groups, by the engine module's parameter names), and
    every engine whose optimizer is an :class:`AdamWMSAMScheduleFree` — from the config or passed
    as ``optimizer=`` — is bound by :func:`attach` when it is built. This is the JSON route of the HF
    Trainer (``TrainingArguments(deepspeed=...)``), Accelerate's DeepSpeed plugin and Lightning.
    Which DeepSpeed methods it replaces, and why: :mod:`sharded_msam_sf.deepspeed.driver`."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    if _ORIGINALS:
        return
    supported = DeepSpeedEngine._is_supported_optimizer
    basic = DeepSpeedEngine._configure_basic_optimizer
    configure = DeepSpeedEngine._configure_optimizer

    def _is_supported_optimizer(self, optimizer_name):
        return is_our_optimizer({"type": optimizer_name}) or supported(self, optimizer_name)

    def _configure_basic_optimizer(self, model_parameters):
        name = self.optimizer_name()
        if not is_our_optimizer({"type": name}):
            return basic(self, model_parameters)
        section = {"type": name, "params": dict(self.optimizer_params() or {})}
        opt_kwargs = optimizer_kwargs_from_config(section, grouping=True)
        check_deepspeed_config(getattr(self._config, "_param_dict", {}) or {}, opt_kwargs.get("sam_mode", "one_pass"))
        self._config.zero_allow_untested_optimizer = True
        params = _grouped(section, self.module, model_parameters, opt_kwargs)
        return AdamWMSAMScheduleFree(params, **opt_kwargs, backend=DeepSpeedBackend())

    def _configure_optimizer(self, client_optimizer, model_parameters):
        configure(self, client_optimizer, model_parameters)
        if isinstance(getattr(self.optimizer, "optimizer", None), AdamWMSAMScheduleFree):
            attach(self)

    _ORIGINALS.update(_is_supported_optimizer=supported, _configure_basic_optimizer=basic,
                      _configure_optimizer=configure)
    DeepSpeedEngine._is_supported_optimizer = _is_supported_optimizer
    DeepSpeedEngine._configure_basic_optimizer = _configure_basic_optimizer
    DeepSpeedEngine._configure_optimizer = _configure_optimizer


def unregister() -> None:
    """Put DeepSpeed's methods back (engines already built stay attached)."""
    if not _ORIGINALS:
        return
    from deepspeed.runtime.engine import DeepSpeedEngine
    for name, fn in _ORIGINALS.items():
        setattr(DeepSpeedEngine, name, fn)
    _ORIGINALS.clear()


def registered() -> bool:
    """Whether :func:`register` is in effect."""
    return bool(_ORIGINALS)


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
