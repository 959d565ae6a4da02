"""Plug AdamWMSAMScheduleFree into DeepSpeed — the wing above the optimizer (the optimizer itself
names no engine; what it sees of DeepSpeed's tensors is :mod:`sharded_msam_sf.backends.zero`).

::

    from sharded_msam_sf.deepspeed import initialize
    engine, optimizer, _, _ = initialize(model=model, config="configs/deepspeed/zero2-cpu.json")
    optimizer.train()
    for x, y in data:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
    optimizer.eval()                       # engine.module now computes with the averaged x

An engine built by someone else around our optimizer (``deepspeed.initialize(...,
optimizer=AdamWMSAMScheduleFree(params))``): ``optimizer = attach(engine)``; or, before any engine
is built, :func:`register` (then every ``deepspeed.initialize`` builds ours from a config that names
it and attaches it). Checkpoints: ``engine.save_checkpoint``/``load_checkpoint`` at the same world
size and ZeRO stage; at another, ``python -m sharded_msam_sf.checkpoint to-universal CKPT OUT`` and
:func:`load_universal` ``(engine, OUT)`` (docs/checkpoints.md).

=====================  ===========================================================================
module                 what it holds
=====================  ===========================================================================
:mod:`.initialize`     :func:`initialize` (our optimizer named in the JSON), :func:`init_distributed`
:mod:`.register`       :func:`register` / :func:`unregister`: ``deepspeed.initialize`` learns ours
:mod:`.facade`         :func:`attach`, :class:`DeepSpeedMSAMOptimizer`, :func:`facade_of`,
                       :func:`find_optimizer`
:mod:`.driver`         ``ZeroDriver`` (one gathered optimizer call per ZeRO step) and the table of
                       every DeepSpeed internal the wing touches
:mod:`.ds_config`      loading and checking a DeepSpeed JSON config that names ours
:mod:`.decay_groups`   the HF Trainer's weight-decay groups for the JSON route
:mod:`.parallel`       tensor (``mpu``) and pipeline (``PipelineEngine``) parallel layouts
:mod:`.universal`      :func:`load_universal`: universal checkpoints with our state
:mod:`.weights`        :func:`gathered`, :func:`full_fp32_state_dict`
=====================  ===========================================================================
"""
from __future__ import annotations

from ..config import ConfigError
from .facade import DeepSpeedMSAMOptimizer, attach, facade_of, find_optimizer
from .initialize import init_distributed, initialize
from .register import register, registered, unregister
from .universal import UniversalCheckpointError, load_universal
from .weights import full_fp32_state_dict, gathered

__all__ = ["initialize", "init_distributed", "attach", "register", "unregister", "registered", "facade_of",
           "find_optimizer", "DeepSpeedMSAMOptimizer", "ConfigError", "load_universal", "UniversalCheckpointError",
           "full_fp32_state_dict", "gathered"]
