"""Sharding back ends, and the one rule that picks one for a set of parameters.

:func:`resolve_backend` is the only place an engine is chosen. The rule, in order (the first
that applies wins):

======  ==========================================  ============================================
order   when                                        back end
======  ==========================================  ============================================
1       ``backend=`` is given                       that one, as given
2       a parameter is a DeepSpeed ZeRO-3 param     :class:`~.zero.DeepSpeedBackend` (its
        (``ds_id``)                                 driver binds it to the engine)
3       a parameter is a DTensor (FSDP2             :class:`~.fsdp2.FSDP2Backend` (1-D mesh, HSDP
        ``fully_shard``, HSDP)                      mesh)
4       a parameter is an FSDP1 flat parameter or   :class:`~.fsdp1.FSDP1Backend`
        one of its ``use_orig_params`` views
5       ``model=`` is a ``DistributedDataParallel``  :class:`~.ddp.DDPBackend` over the model's (or
        or ``process_group=`` is given              the given) group
6       otherwise (one process, DDP params alone)   :class:`~.local.LocalBackend`
then    ``pipeline_group=`` is given (one optimizer  :class:`~.pipeline.PipelineBackend` wrapping
        per ``torch.distributed.pipelining``        the back end chosen above (its reduction
        stage)                                      spans the stages)
======  ==========================================  ============================================

:func:`engine_kind` names the rule that applies (``"explicit"``, ``"deepspeed"``, ``"fsdp2"``,
``"fsdp1"``, ``"ddp"``, ``"local"``): the analysis functions and the benchmarks use it
instead of detecting engines themselves. ``process_group=`` overrides the group over which
the local sums of squares add up; ``model=`` (the wrapped model) lets the FSDP back ends find
their modules without searching. With ``pipeline_group=`` the back end is chosen for the
stage's params alone (``process_group=`` then names the group of the one all-reduce over all
stages, see :mod:`~.pipeline`); an engine back end whose constructor takes ``pipeline_group=``
itself gets it (its shares already span the stages). Adding an engine: one file with a
:class:`Backend` subclass and one row here. The optimizer applies the rule again whenever the params it holds change
identity or kind (late binding, ``AdamWMSAMScheduleFree._binding``); a given ``backend=`` is never
re-resolved.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from .base import LOCAL, Backend, Reduction, Share
from .local import LocalBackend

__all__ = ["Backend", "Share", "Reduction", "LOCAL", "LocalBackend", "DDPBackend", "FSDP1Backend",
           "FSDP2Backend", "PipelineBackend", "RULES", "engine_kind", "resolve_backend", "is_dtensor",
           "is_fsdp1_param", "is_deepspeed_param", "is_ddp_model"]


def __getattr__(name):  # the engine back ends import torch.distributed pieces lazily
    if name == "FSDP2Backend":
        from .fsdp2 import FSDP2Backend
        return FSDP2Backend
    if name == "FSDP1Backend":
        from .fsdp1 import FSDP1Backend
        return FSDP1Backend
    if name == "DDPBackend":
        from .ddp import DDPBackend
        return DDPBackend
    if name == "PipelineBackend":
        from .pipeline import PipelineBackend
        return PipelineBackend
    raise AttributeError(name)


def is_dtensor(t: Tensor) -> bool:
    """A ``torch.distributed.tensor.DTensor`` (FSDP2 / HSDP / tensor-parallel parameters)."""
    from .fsdp2 import is_dtensor as check
    return check(t)


def is_fsdp1_param(t: Tensor) -> bool:
    """An FSDP1 ``FlatParameter`` or an original parameter flattened into one."""
    from .fsdp1 import is_fsdp1_param as check
    return check(t)


def is_deepspeed_param(t: Tensor) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (``zero.Init`` / the stage-3 engine)."""
    return hasattr(t, "ds_id")


def is_ddp_model(model: Optional[torch.nn.Module]) -> bool:
    from torch.nn.parallel import DistributedDataParallel
    return isinstance(model, DistributedDataParallel)


# ---------------------------------------------------------------- the rule
def _deepspeed(params, process_group, model) -> Backend:
    from .zero import DeepSpeedBackend
    return DeepSpeedBackend()


def _fsdp2(params, process_group, model) -> Backend:
    from .fsdp2 import FSDP2Backend
    return FSDP2Backend(params, process_group=process_group, model=model)


def _fsdp1(params, process_group, model) -> Backend:
    from .fsdp1 import FSDP1Backend
    return FSDP1Backend(params, process_group=process_group, model=model)


def _ddp(params, process_group, model) -> Backend:
    from .ddp import DDPBackend
    group = process_group if process_group is not None else model.process_group
    return DDPBackend(group, device=params[0].device if params else None)


def _local(params, process_group, model) -> Backend:
    return LocalBackend()


_Match = Callable[[List[Tensor], object, Optional[torch.nn.Module]], bool]
RULES: Tuple[Tuple[str, _Match, Callable[..., Backend]], ...] = (
    ("deepspeed", lambda ps, pg, m: any(is_deepspeed_param(p) for p in ps), _deepspeed),
    ("fsdp2", lambda ps, pg, m: any(is_dtensor(p) for p in ps), _fsdp2),
    ("fsdp1", lambda ps, pg, m: any(is_fsdp1_param(p) for p in ps), _fsdp1),
    ("ddp", lambda ps, pg, m: pg is not None or is_ddp_model(m), _ddp),
    ("local", lambda ps, pg, m: True, _local),
)


def engine_kind(params: Iterable[Tensor], *, process_group=None, model: Optional[torch.nn.Module] = None) -> str:
    """The name of the first rule of :data:`RULES` that applies to these parameters."""
    params = list(params)
    return next(name for name, matches, _ in RULES if matches(params, process_group, model))


def resolve_backend(params: Iterable[Tensor], *, backend: Optional[Backend] = None, process_group=None,
                    model: Optional[torch.nn.Module] = None, pipeline_group=None) -> Backend:
    """The back end for these parameters: ``backend`` if given, else the first rule that applies;
    with ``pipeline_group`` that one wrapped in a :class:`~.pipeline.PipelineBackend`."""
    if backend is not None and not isinstance(backend, Backend):
        raise TypeError(f"backend must be a sharded_msam_sf.backends.Backend, got {type(backend).__name__}")
    if pipeline_group is None:
        return backend if backend is not None else _by_rules(list(params), process_group, model)
    from .pipeline import PipelineBackend, accepts_pipeline_group
    params = list(params)
    spans = False
    if backend is None:
        name = engine_kind(params, model=model)
        if name == "fsdp2":
            from .fsdp2 import FSDP2Backend
            spans = accepts_pipeline_group(FSDP2Backend)
        backend = (FSDP2Backend(params, model=model, pipeline_group=pipeline_group) if spans
                   else _by_rules(params, None, model))
    device = params[0].device if params else None
    return PipelineBackend(backend, pipeline_group, process_group=process_group, spans_stages=spans, device=device)


def _by_rules(params: List[Tensor], process_group, model: Optional[torch.nn.Module]) -> Backend:
    for _, matches, build in RULES:
        if matches(params, process_group, model):
            return build(params, process_group, model)
    raise AssertionError("the last rule always applies")  # pragma: no cover
