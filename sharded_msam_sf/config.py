"""The JSON schema of our optimizer section in a DeepSpeed-style config (pydantic models).

A DeepSpeed config names the optimizer like this (every ``params`` key optional,
defaults as :class:`~sharded_msam_sf.AdamWMSAMScheduleFree`)::

    "optimizer": {
      "type": "AdamWMSAMScheduleFree",
      "params": {"lr": 0.0025, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1,
                 "warmup_steps": 0, "r": 0.0, "weight_lr_power": 2.0, "rho": 1.0,
                 "ascent_beta": null, "sam_mode": "one_pass", "foreach": null,
                 "fused": null, "state_dtype": null, "no_decay_bias_and_norm": false}
    }

:class:`OptimizerSection` is the schema (``OptimizerSection.model_json_schema()``);
every value goes through :func:`sharded_msam_sf.hyperparams.check` and the keys together
through :func:`~sharded_msam_sf.hyperparams.validate`, the validator the optimizer and
the reference use. :func:`optimizer_kwargs_from_config` checks a section and returns
the keyword arguments of the optimizer; ``no_decay_bias_and_norm`` (:data:`GROUPING_PARAMS`)
is not a hyperparameter but how the DeepSpeed routes group the parameters
(:func:`grouping_from_config`). Every error is a :class:`ConfigError` (a ``ValueError``)
whose message starts with the key, e.g.
``optimizer.params.rhoo: unknown key (valid: lr, betas, ...)``.
"""
from __future__ import annotations

from typing import Any, Dict, Literal, Mapping, Optional, Tuple

import pydantic
from pydantic import BaseModel, ConfigDict, Field, SkipValidation, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from . import hyperparams as H

__all__ = ["ConfigError", "OPTIMIZER_TYPE", "OPTIMIZER_PARAMS", "GROUPING_PARAMS", "OptimizerParams",
           "OptimizerSection", "is_our_optimizer", "optimizer_kwargs_from_config", "grouping_from_config"]

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
# keys of the section that are not hyperparameters: how the DeepSpeed routes split the model's parameters into
# groups (read by sharded_msam_sf.deepspeed; every other user of the section refuses them when set)
GROUPING_PARAMS: Dict[str, str] = {
    "no_decay_bias_and_norm": "true or false; default false. true: two param groups as the HF Trainer makes them "
                              "(sharded_msam_sf.deepspeed.decay_groups): weight_decay on every parameter but biases and "
                              "normalisation weights, which get 0. Only the DeepSpeed routes (initialize, "
                              "register()) read it",
}
_STATE_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


class ConfigError(ValueError):
    """A bad optimizer section; the message starts with the offending key."""


def _from_json(key: str, value: Any) -> Any:
    """The Python value of a JSON value (a list of betas, a dtype name); others as they are."""
    if key == "betas" and isinstance(value, list):
        return tuple(value)
    if key == "state_dtype" and isinstance(value, str) and value in _STATE_DTYPES:
        import torch
        return getattr(torch, _STATE_DTYPES[value])
    return value


def _d(key: str) -> str:
    return f"{OPTIMIZER_PARAMS[key]}; default {H.DEFAULTS[key]!r}".replace("None", "null")


class OptimizerParams(BaseModel):
    """The optimizer's hyperparameters; an absent key takes the optimizer's default."""
    # The types are the JSON Schema's; the values are checked by hyperparams.check alone (SkipValidation),
    # which also takes what a Python caller may pass (a tuple of betas, a 0-d tensor lr, a torch dtype).
    model_config = ConfigDict(extra="forbid")

    lr: SkipValidation[float] = Field(H.DEFAULTS["lr"], description=_d("lr"))
    betas: SkipValidation[Tuple[float, float]] = Field(H.DEFAULTS["betas"], description=_d("betas"))
    eps: SkipValidation[float] = Field(H.DEFAULTS["eps"], description=_d("eps"))
    weight_decay: SkipValidation[float] = Field(H.DEFAULTS["weight_decay"], description=_d("weight_decay"))
    warmup_steps: SkipValidation[int] = Field(H.DEFAULTS["warmup_steps"], description=_d("warmup_steps"))
    r: SkipValidation[float] = Field(H.DEFAULTS["r"], description=_d("r"))
    weight_lr_power: SkipValidation[float] = Field(H.DEFAULTS["weight_lr_power"],
                                                   description=_d("weight_lr_power"))
    rho: SkipValidation[Optional[float]] = Field(H.DEFAULTS["rho"],
                                                 description=_d("rho") + " (1.0 in one_pass, 0.05 in two_pass)")
    ascent_beta: SkipValidation[Optional[float]] = Field(H.DEFAULTS["ascent_beta"], description=_d("ascent_beta"))
    sam_mode: SkipValidation[Literal[H.SAM_MODES]] = Field(H.DEFAULTS["sam_mode"], description=_d("sam_mode"))
    foreach: SkipValidation[Optional[bool]] = Field(H.DEFAULTS["foreach"], description=_d("foreach"))
    fused: SkipValidation[Optional[bool]] = Field(H.DEFAULTS["fused"], description=_d("fused"))
    state_dtype: SkipValidation[Optional[Literal[tuple(_STATE_DTYPES)]]] = Field(None,
                                                                                 description=_d("state_dtype"))
    # validated here, left out of the JSON Schema: the main job's config (whose schema embeds this one) refuses it
    no_decay_bias_and_norm: SkipJsonSchema[SkipValidation[bool]] = Field(
        False, description=GROUPING_PARAMS["no_decay_bias_and_norm"])

    @field_validator("*", mode="before")
    @classmethod
    def _check(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        """Every value through hyperparams.check: what the optimizer refuses, the config refuses."""
        if info.field_name in GROUPING_PARAMS:
            if not isinstance(value, bool):
                raise ConfigError(f"invalid value {value!r} (valid: {GROUPING_PARAMS[info.field_name]})")
            return value
        try:
            H.check(info.field_name, _from_json(info.field_name, value))
        except H.InvalidHyperparameter:
            raise ConfigError(f"invalid value {value!r} (valid: {OPTIMIZER_PARAMS[info.field_name]})") from None
        return value

    def kwargs(self) -> Dict[str, Any]:
        """The optimizer's keyword arguments: the keys given, as Python values (betas a tuple, a torch dtype)."""
        out = {k: _from_json(k, getattr(self, k)) for k in OPTIMIZER_PARAMS if k in self.model_fields_set}
        if "betas" in out:
            out["betas"] = tuple(float(b) for b in out["betas"])
        return out

    @model_validator(mode="after")
    def _together(self) -> "OptimizerParams":
        try:  # the rules between keys (fused and foreach)
            H.validate(self.kwargs())
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self


def _norm_type(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def is_our_optimizer(section: Any) -> bool:
    """True if ``section`` is an optimizer section whose ``type`` names our optimizer."""
    return (isinstance(section, Mapping) and isinstance(section.get("type"), str)
            and _norm_type(section["type"]) in _TYPE_ALIASES)


class OptimizerSection(BaseModel):
    """``{"type": "AdamWMSAMScheduleFree", "params": {...}}``."""
    model_config = ConfigDict(extra="forbid")

    type: str = Field(description=f"\"{OPTIMIZER_TYPE}\" (case, '_' and '-' are ignored)",
                      json_schema_extra={"examples": [OPTIMIZER_TYPE]})
    params: OptimizerParams = Field(default_factory=OptimizerParams)

    @field_validator("type")
    @classmethod
    def _ours(cls, value: str) -> str:
        if not is_our_optimizer({"type": value}):
            raise ConfigError(f"{value!r} is not {OPTIMIZER_TYPE!r} (other optimizers go to DeepSpeed's own "
                              "config handling)")
        return value

    @field_validator("params", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


def _message(err: dict, prefix: str) -> str:
    """One pydantic error as '<key>: <what is wrong>', the key with the section's prefix."""
    key = ".".join([prefix, *map(str, err["loc"])])
    exc = (err.get("ctx") or {}).get("error")
    if isinstance(exc, ConfigError):
        return f"{key}: {exc}"
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        model = OptimizerParams if len(err["loc"]) > 1 else OptimizerSection
        return f"{key}: unknown key (valid: {', '.join(model.model_fields)})"
    if kind == "missing" and err["loc"] == ("type",):
        return f"{key}: missing (set \"type\": \"{OPTIMIZER_TYPE}\")"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        hint = f" {{\"type\": \"{OPTIMIZER_TYPE}\", \"params\": {{...}}}}" if not err["loc"] else ""
        return f"{key}: must be a JSON object{hint}, got {type(value).__name__}"
    msg = err["msg"]
    return f"{key}: {msg[:1].lower()}{msg[1:]}, got {value!r}"


def _params(section: Mapping[str, Any], prefix: str) -> OptimizerParams:
    try:
        return OptimizerSection.model_validate(section).params
    except pydantic.ValidationError as e:
        raise ConfigError("; ".join(_message(err, prefix) for err in e.errors())) from None


def optimizer_kwargs_from_config(section: Mapping[str, Any], prefix: str = "optimizer", *,
                                 grouping: bool = False) -> Dict[str, Any]:
    """Validate ``{"type": "AdamWMSAMScheduleFree", "params": {...}}``; return the optimizer kwargs.

    Raises :class:`ConfigError` naming the key (``optimizer.params.<key>``)
    for a missing or foreign type, an unknown key, or a bad value. ``betas`` is returned as a
    tuple; absent keys are left to the optimizer's defaults. A :data:`GROUPING_PARAMS` key set
    to true is refused unless ``grouping`` (the caller reads it with :func:`grouping_from_config`):
    a caller that builds the groups itself would otherwise ignore it silently.
    """
    params = _params(section, prefix)
    if not grouping:
        for key in GROUPING_PARAMS:
            if getattr(params, key):
                raise ConfigError(f"{prefix}.params.{key}: only the DeepSpeed routes (sharded_msam_sf.deepspeed."
                                  f"initialize, register()) split the parameters into groups; here the groups are "
                                  f"built elsewhere: remove the key")
    return params.kwargs()


def grouping_from_config(section: Mapping[str, Any], prefix: str = "optimizer") -> Dict[str, bool]:
    """The section's :data:`GROUPING_PARAMS` (validated as :func:`optimizer_kwargs_from_config` does)."""
    params = _params(section, prefix)
    return {key: bool(getattr(params, key)) for key in GROUPING_PARAMS}
