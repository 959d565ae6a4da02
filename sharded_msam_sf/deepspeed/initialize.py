"""``deepspeed.initialize`` with AdamWMSAMScheduleFree named in the DeepSpeed JSON config
(:func:`initialize`), and :func:`init_distributed` (DeepSpeed's, with the ranks of whichever
launcher started us).

The config is an ordinary DeepSpeed config whose optimizer section names ours::

    "optimizer": {"type": "AdamWMSAMScheduleFree",
                  "params": {"lr": 0.0025, "rho": 1.0, "sam_mode": "one_pass", "weight_decay": 0.1}}

That section is validated (:mod:`.ds_config`: unknown keys and bad values are
:class:`~sharded_msam_sf.config.ConfigError`\\ s naming the key) and removed; everything else goes
to ``deepspeed.initialize`` untouched, with ``zero_allow_untested_optimizer`` set. The optimizer
returned is the :class:`~.facade.DeepSpeedMSAMOptimizer` of the engine (:func:`~.facade.attach`).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist

from ..backends.zero import DeepSpeedBackend
from ..config import ConfigError, grouping_from_config, is_our_optimizer, optimizer_kwargs_from_config
from ..hyperparams import DEFAULTS
from ..optimizer import AdamWMSAMScheduleFree
from .decay_groups import decay_groups
from .ds_config import check_deepspeed_config, client_config, load_deepspeed_config
from .facade import attach
from .parallel import refuse_pipeline_two_pass

__all__ = ["initialize", "init_distributed", "grouped_params"]


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
    params = grouped_params(section, model, params, opt_kwargs)
    optimizer = AdamWMSAMScheduleFree(params, **opt_kwargs, backend=DeepSpeedBackend())
    engine, _, dataloader, lr_scheduler = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, config=client_config(ds), **kwargs)
    return engine, attach(engine), dataloader, lr_scheduler


def grouped_params(section: Mapping[str, Any], model: torch.nn.Module, params: Any, opt_kwargs: Dict[str, Any]) -> Any:
    """``params``, or with ``"no_decay_bias_and_norm": true`` the HF Trainer's two weight-decay groups
    (:func:`~sharded_msam_sf.deepspeed.decay_groups.decay_groups`; the section's weight_decay, and 0 for biases and norms)."""
    if not grouping_from_config(section)["no_decay_bias_and_norm"]:
        return params
    try:
        return decay_groups(model, params, opt_kwargs.get("weight_decay", DEFAULTS["weight_decay"]))
    except ValueError as e:
        raise ConfigError(f"optimizer.params.{e}") from None
