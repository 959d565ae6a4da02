"""The hyperparameters of AdamWMSAMScheduleFree: defaults, sam modes, default rho, one validator.

Used by the optimizer (at construction, in ``add_param_group``, ``load_state_dict`` and
again at every ``step()``, since ``param_groups`` may be edited in between), by the JSON
config schema (:mod:`sharded_msam_sf.config`) and by the reference
(:mod:`sharded_msam_sf.reference`).

=================  =============  =============================================================
name               default        valid
=================  =============  =============================================================
lr                 0.0025         a finite number >= 0 (γ, the peak learning rate)
betas              (0.9, 0.999)   a pair: 1e-6 <= β1 < 1 (eval() divides by β1), 0 <= β2 < 1
eps                1e-8           a finite number >= 0 (added outside the square root)
weight_decay       0.0            a finite number >= 0 (λ, decoupled, applied at y)
warmup_steps       0              an integer >= 0 (linear warm-up of γ)
r                  0.0            a finite number >= 0 (polynomial weighting power)
weight_lr_power    2.0            a finite number >= 0 (p in the averaging weight γ_max^p)
rho                None           None or a finite number >= 0; None is :func:`default_rho`
ascent_beta        None           None (= β1) or 0 <= β_m < 1 (decay of the momentum m)
sam_mode           "one_pass"     one of :data:`SAM_MODES`
foreach            None           None, True or False
fused              None           None, True or False (not True together with foreach=True)
state_dtype        None           None, torch.float32 or torch.bfloat16
=================  =============  =============================================================

Unknown param-group keys (``learning_rate`` for ``lr``) are refused by :func:`check_group_keys` (torch
ignores them). Values that are valid but far outside what trains (``lr`` above :data:`SANE_MAX` ``["lr"]``,
``rho`` or ``weight_decay`` above theirs) are named by :func:`extreme`: a warning at construction, and in
the warning of a step skipped for a non-finite gradient (the usual consequence).

"A number" is an ``int`` or ``float`` (or another real scalar such as a numpy float) and
never a ``bool``: ``lr=True`` is refused, not read as 1. ``lr`` may also be a 0-d tensor
(as torch.optim allows) holding such a value. Messages follow torch's wording:
``Invalid beta parameter at index 1: 1.0 (valid: 0 <= beta2 < 1)``.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor

__all__ = ["DEFAULTS", "SAM_MODES", "STATE_DTYPES", "SANE_MAX", "InvalidHyperparameter", "default_rho", "check",
           "validate", "resolved_rho", "check_group_keys", "extreme"]

SAM_MODES = ("one_pass", "two_pass")
_DEFAULT_RHO = {"one_pass": 1.0, "two_pass": 0.05}
STATE_DTYPES = (None, torch.float32, torch.bfloat16)

DEFAULTS: Dict[str, Any] = dict(
    lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0, r=0.0, weight_lr_power=2.0,
    rho=None, ascent_beta=None, sam_mode="one_pass", foreach=None, fused=None, state_dtype=None,
)


def default_rho(sam_mode: str) -> float:
    """rho=None means 1.0 in one_pass (MSAM's AdamW default) and 0.05 in two_pass (SAM's)."""
    check("sam_mode", sam_mode)
    return _DEFAULT_RHO[sam_mode]


def resolved_rho(rho: Optional[float], sam_mode: str) -> float:
    """``rho``, or :func:`default_rho` when it is None."""
    return default_rho(sam_mode) if rho is None else rho


class InvalidHyperparameter(ValueError):
    """A bad hyperparameter value; ``name`` (the key), ``value`` and ``valid`` (the rule in words)."""

    def __init__(self, label: str, name: str, value: Any, valid: str) -> None:
        super().__init__(f"Invalid {label}: {value!r} (valid: {valid})")
        self.name, self.value, self.valid = name, value, valid


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _finite_ge0(v: Any) -> bool:
    return _real(v) and math.isfinite(v) and v >= 0.0


def _lr_value(v: Any) -> Any:
    if isinstance(v, Tensor) and v.numel() == 1 and v.is_floating_point():
        return v.item()
    return v


# name -> (label in the message, rule in words, check)
_RULES = {
    "lr": ("learning rate (lr)", "a finite number >= 0", lambda v: _finite_ge0(_lr_value(v))),
    "eps": ("epsilon value (eps)", "a finite number >= 0", _finite_ge0),
    "weight_decay": ("weight_decay", "a finite number >= 0", _finite_ge0),
    "warmup_steps": ("warmup_steps", "an integer >= 0",
                     lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0),
    "r": ("r", "a finite number >= 0", _finite_ge0),
    "weight_lr_power": ("weight_lr_power", "a finite number >= 0", _finite_ge0),
    "rho": ("rho", "None or a finite number >= 0 (0 gives plain Schedule-Free AdamW)",
            lambda v: v is None or _finite_ge0(v)),
    "ascent_beta": ("ascent_beta", "None (= beta1) or 0 <= ascent_beta < 1",
                    lambda v: v is None or (_real(v) and 0.0 <= v < 1.0)),
    "sam_mode": ("sam_mode", " or ".join(repr(m) for m in SAM_MODES), lambda v: isinstance(v, str) and v in SAM_MODES),
    "foreach": ("foreach", "None, True or False", lambda v: v is None or isinstance(v, bool)),
    "fused": ("fused", "None, True or False", lambda v: v is None or isinstance(v, bool)),
    "state_dtype": ("state_dtype", "None, torch.float32 or torch.bfloat16",
                    lambda v: v is None or (isinstance(v, torch.dtype) and v in STATE_DTYPES)),
}
_MIN_BETA1 = 1e-6
_BETA_RULES = (
    (f"0 < beta1 < 1 and beta1 >= {_MIN_BETA1:g}; eval() recovers x from y and z by dividing by beta1, which "
     "overflows the params for a smaller beta1 (and fails for 0)", lambda b: _real(b) and _MIN_BETA1 <= b < 1.0),
    ("0 <= beta2 < 1", lambda b: _real(b) and 0.0 <= b < 1.0),
)


def check(name: str, value: Any) -> None:
    """Raise :class:`InvalidHyperparameter` if ``value`` is not valid for ``name`` (a key of DEFAULTS)."""
    if name == "betas":
        if not (isinstance(value, (tuple, list)) and len(value) == 2):
            raise InvalidHyperparameter("betas", "betas", value, "a pair (beta1, beta2)")
        for i, (b, (valid, ok)) in enumerate(zip(value, _BETA_RULES)):
            if not ok(b):
                raise InvalidHyperparameter(f"beta parameter at index {i}", "betas", b, valid)
        return
    if name not in _RULES:
        raise KeyError(f"unknown hyperparameter {name!r} (known: {', '.join(DEFAULTS)})")
    label, valid, ok = _RULES[name]
    try:
        good = bool(ok(value))
    except (TypeError, ValueError):
        good = False
    if not good:
        raise InvalidHyperparameter(label, name, value, valid)


def validate(group: Mapping[str, Any]) -> None:
    """Check every hyperparameter of ``group`` (a param group, or keyword arguments) that is
    a key of :data:`DEFAULTS`, and the rules between them (fused and foreach)."""
    for name in DEFAULTS:
        if name in group:
            check(name, group[name])
    if group.get("fused") and group.get("foreach"):
        raise ValueError("Invalid fused/foreach: fused=True and foreach=True cannot be set together")


# the group keys the optimizer itself keeps (besides DEFAULTS) and those torch and its schedulers add
_OWN_KEYS = ("params", "param_names", "initial_lr", "k", "train_mode", "weight_sum", "lr_max", "ascent_scale",
             "at_ascent", "scheduled_lr", "skipped_steps", "skip_pending", "ascent_taken", "v_overflow_steps")


def check_group_keys(group: Mapping[str, Any]) -> None:
    """Refuse keys of a param group that are neither hyperparameters nor the optimizer's own: torch would
    ignore ``{"params": ..., "learning_rate": 0.1}`` and train that group with the default lr."""
    unknown = sorted(k for k in group if k not in DEFAULTS and k not in _OWN_KEYS)
    if unknown:
        import difflib
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(
                 k.replace("learning_rate", "lr"), list(DEFAULTS), n=1, cutoff=0.5)) else repr(k) for k in unknown]
        raise ValueError(f"Invalid param group: unknown key(s) {', '.join(hints)} (valid: {', '.join(DEFAULTS)}); "
                         "torch would ignore them silently")


# valid but far beyond what trains: named in a warning (see the module docstring)
SANE_MAX = {"lr": 10.0, "rho": 100.0, "weight_decay": 1.0}


def extreme(group: Mapping[str, Any]) -> list:
    """Phrases naming the hyperparameters of ``group`` above :data:`SANE_MAX` (empty: none)."""
    out = []
    for name, bound in SANE_MAX.items():
        v = _lr_value(group.get(name))
        if _real(v) and math.isfinite(v) and v > bound:
            out.append(f"{name}={v:g} (above {bound:g})")
    return out
