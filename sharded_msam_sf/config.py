"""The JSON schema of our optimizer section in a DeepSpeed-style config.

A DeepSpeed config names the optimizer like this (every ``params`` key optional,
defaults as :class:`~sharded_msam_sf.AdamWMSAMScheduleFree`)::

    "optimizer": {
      "type": "AdamWMSAMScheduleFree",
      "params": {"lr": 0.0025, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1,
                 "warmup_steps": 0, "r": 0.0, "weight_lr_power": 2.0, "rho": 1.0,
                 "ascent_beta": null, "sam_mode": "one_pass", "foreach": null,
                 "fused": null, "state_dtype": null}
    }

:func:`optimizer_kwargs_from_config` checks the section and returns the keyword
arguments of the optimizer; every error is a :class:`ConfigError` (a ``ValueError``)
whose message starts with the key, e.g.
``optimizer.params.rhoo: unknown key (valid: lr, betas, ...)``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

from . import hyperparams as H

__all__ = ["ConfigError", "OPTIMIZER_TYPE", "OPTIMIZER_PARAMS", "is_our_optimizer", "optimizer_kwargs_from_config"]

OPTIMIZER_TYPE = "AdamWMSAMScheduleFree"
# accepted spellings of the type (compared case-insensitively, '_' and '-' ignored)
_TYPE_ALIASES = ("adamwmsamschedulefree",)

# key -> the valid values, in JSON's words; the rules themselves are hyperparams.check's
OPTIMIZER_PARAMS: Dict[str, str] = {
    "lr": "a finite number >= 0",
    "betas": "a list [beta1, beta2] with 0 < beta1 < 1 and 0 <= beta2 < 1",
    "eps": "a finite number >= 0",
    "weight_decay": "a finite number >= 0",
    "warmup_steps": "an integer >= 0",
    "r": "a finite number >= 0",
    "weight_lr_power": "a finite number >= 0",
    "rho": "null or a finite number >= 0 (0 gives plain Schedule-Free AdamW)",
    "ascent_beta": "null (= beta1) or a number with 0 <= ascent_beta < 1",
    "sam_mode": " or ".join(f'"{m}"' for m in H.SAM_MODES),
    "foreach": "null, true or false",
    "fused": "null (fused where it pays), true or false",
    "state_dtype": "null (fp32), \"float32\" or \"bfloat16\" (stochastically rounded state)",
}
assert tuple(OPTIMIZER_PARAMS) == tuple(H.DEFAULTS), "config.OPTIMIZER_PARAMS must list hyperparams.DEFAULTS"
_STATE_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
_SECTION_KEYS = ("type", "params")


def _from_json(key: str, value: Any) -> Any:
    """The Python value of a JSON value (a list of betas, a dtype name); others as they are."""
    if key == "betas" and isinstance(value, list):
        return tuple(value)
    if key == "state_dtype" and isinstance(value, str) and value in _STATE_DTYPES:
        import torch
        return getattr(torch, _STATE_DTYPES[value])
    return value


class ConfigError(ValueError):
    """A bad optimizer section; the message starts with the offending key."""


def _norm_type(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def is_our_optimizer(section: Any) -> bool:
    """True if ``section`` is an optimizer section whose ``type`` names our optimizer."""
    return (isinstance(section, Mapping) and isinstance(section.get("type"), str)
            and _norm_type(section["type"]) in _TYPE_ALIASES)


def optimizer_kwargs_from_config(section: Mapping[str, Any], prefix: str = "optimizer") -> Dict[str, Any]:
    """Validate ``{"type": "AdamWMSAMScheduleFree", "params": {...}}``; return the optimizer kwargs.

    Raises :class:`ConfigError` naming the key (``optimizer.type``,
    ``optimizer.params.<key>``) for a missing or foreign type, an unknown key, or a bad
    value. ``betas`` is returned as a tuple; absent keys are left to the optimizer's
    defaults.
    """
    if not isinstance(section, Mapping):
        raise ConfigError(f"{prefix}: must be a JSON object {{\"type\": \"{OPTIMIZER_TYPE}\", \"params\": {{...}}}}, "
                          f"got {type(section).__name__}")
    unknown = [k for k in section if k not in _SECTION_KEYS]
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key (valid: {', '.join(_SECTION_KEYS)})")
    if "type" not in section:
        raise ConfigError(f"{prefix}.type: missing (set \"type\": \"{OPTIMIZER_TYPE}\")")
    if not is_our_optimizer(section):
        raise ConfigError(f"{prefix}.type: {section['type']!r} is not {OPTIMIZER_TYPE!r} "
                          f"(other optimizers go to DeepSpeed's own config handling)")
    params = section.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{prefix}.params: must be a JSON object, got {type(params).__name__}")
    kwargs: Dict[str, Any] = {}
    for key, value in params.items():
        if key not in OPTIMIZER_PARAMS:
            raise ConfigError(f"{prefix}.params.{key}: unknown key (valid: {', '.join(OPTIMIZER_PARAMS)})")
        converted = _from_json(key, value)
        try:
            H.check(key, converted)
        except H.InvalidHyperparameter:
            raise ConfigError(f"{prefix}.params.{key}: invalid value {value!r} (valid: {OPTIMIZER_PARAMS[key]})") from None
        if key == "betas":
            converted = tuple(float(b) for b in converted)
        kwargs[key] = converted
    try:
        H.validate(kwargs)
    except ValueError as e:  # the rules between keys (fused and foreach)
        raise ConfigError(f"{prefix}.params: {e}") from None
    return kwargs
