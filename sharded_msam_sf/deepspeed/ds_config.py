"""A DeepSpeed JSON config that names AdamWMSAMScheduleFree: loading and the checks DeepSpeed does not do.

The optimizer section is validated by :func:`sharded_msam_sf.config.optimizer_kwargs_from_config`
(unknown keys and bad values are :class:`~sharded_msam_sf.config.ConfigError`\\ s naming the key);
:func:`check_deepspeed_config` refuses the DeepSpeed settings that would give a wrong trajectory
with our optimizer; :func:`client_config` is what ``deepspeed.initialize`` then gets.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Mapping, Union

from ..config import ConfigError
from ..jsonfile import read_json_object

__all__ = ["load_deepspeed_config", "check_deepspeed_config", "client_config"]


def load_deepspeed_config(config: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
    """A DeepSpeed config from a JSON file path or a dict (a deep copy: the caller's is not changed)."""
    if isinstance(config, (str, os.PathLike)):
        return read_json_object(config)
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    raise ConfigError(f"config: expected a JSON file path or a dict, got {type(config).__name__}")


def check_deepspeed_config(ds: Mapping[str, Any], sam_mode: str) -> None:
    """Raise :class:`ConfigError` for DeepSpeed settings AdamWMSAMScheduleFree cannot run right:
    elastic checkpoints (they drop the per-group step counters), NVMe offload, fp16 without ZeRO
    (stage 0: DeepSpeed's FP16 wrappers, which cannot be bound), and gradient accumulation in
    two_pass (each backward pass must be a whole step's gradient)."""
    zero = ds.get("zero_optimization", {}) or {}
    if not isinstance(zero, Mapping):
        raise ConfigError("zero_optimization: must be a JSON object")
    if zero.get("elastic_checkpoint"):
        raise ConfigError("zero_optimization.elastic_checkpoint: not supported with AdamWMSAMScheduleFree "
                          "(an elastic checkpoint drops the optimizer's per-group step counters); set it to false")
    for key in ("offload_optimizer", "offload_param"):
        dev = (zero.get(key) or {}).get("device") if isinstance(zero.get(key), Mapping) else None
        if dev == "nvme":
            raise ConfigError(f"zero_optimization.{key}.device: 'nvme' is not supported with AdamWMSAMScheduleFree")
    fp16 = ds.get("fp16")
    if zero.get("stage", 0) == 0 and isinstance(fp16, Mapping) and fp16.get("enabled") is True:
        # (bf16 at stage 0 is refused when DeepSpeed's FP16 wrapper first steps the optimizer, not here:
        # a pipeline engine takes the BF16_Optimizer there instead)
        raise ConfigError("zero_optimization.stage: 0 with fp16 enabled wraps the optimizer in DeepSpeed's "
                          "FP16_Optimizer/FP16_UnfusedOptimizer, which AdamWMSAMScheduleFree does not support; set "
                          "zero_optimization.stage to 1, 2 or 3 (or train in fp32)")
    gas = ds.get("gradient_accumulation_steps", 1)
    if sam_mode == "two_pass" and isinstance(gas, int) and gas > 1:
        raise ConfigError("gradient_accumulation_steps: two_pass needs 1 (each backward pass is a whole "
                          "step's gradient); use one_pass with gradient accumulation")


def client_config(ds: Mapping[str, Any]) -> Dict[str, Any]:
    """The config for ``deepspeed.initialize(optimizer=<ours>)``: without the optimizer section (a
    client optimizer cannot be named there), with ``zero_allow_untested_optimizer`` and, under
    ZeRO-Offload, ``zero_force_ds_cpu_optimizer: false`` unless set."""
    out = copy.deepcopy(dict(ds))
    out.pop("optimizer", None)
    out.setdefault("zero_allow_untested_optimizer", True)
    if (out.get("zero_optimization") or {}).get("offload_optimizer"):
        out.setdefault("zero_force_ds_cpu_optimizer", False)
    return out
