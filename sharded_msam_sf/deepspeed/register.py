"""Teach ``deepspeed.initialize`` our optimizer: :func:`register` / :func:`unregister` (the JSON route
of the HF Trainer, Accelerate's DeepSpeed plugin and Lightning; the DeepSpeedEngine methods it
replaces are listed in :mod:`.driver`)."""
from __future__ import annotations

from typing import Any, Dict

from ..backends.zero import DeepSpeedBackend
from ..config import is_our_optimizer, optimizer_kwargs_from_config
from ..optimizer import AdamWMSAMScheduleFree
from .ds_config import check_deepspeed_config
from .facade import attach
from .initialize import grouped_params

__all__ = ["register", "unregister", "registered"]

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
        params = grouped_params(section, self.module, model_parameters, opt_kwargs)
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
