"""Late binding: the optimizer's back end, resolved from the params it holds *now*.

An optimizer is often built before the engine wraps the model (FSDP after construction,
``accelerator.prepare``, DeepSpeed swapping in its flat fp32 partitions). :class:`Binding` keeps
the back end and a key of ``(id, kind)`` per param (:func:`param_kind`: what the rule of
:func:`~sharded_msam_sf.backends.resolve_backend` reads of a param); at each public call of the
optimizer the key is compared, and when it differs the back end is resolved again and the state
of a param that is the same tensor in another object is carried over. A back end given by the
user (``backend=``, ``bind_backend``) or detected with ``pin_when_detected`` is never re-resolved.
"""
from __future__ import annotations

import sys
import weakref
from typing import Any, List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import resolve_backend
from .base import Backend

__all__ = ["Binding", "param_kind"]


def param_kind(p: Tensor) -> Any:
    """What the back-end rule reads of a param: its type (DTensor or not), FSDP1 flattening, ZeRO-3."""
    return (type(p), bool(getattr(p, "_fsdp_flattened", False) or getattr(p, "_is_flat_param", False)),
            hasattr(p, "ds_id"))


class Binding:
    """The optimizer's back end, resolved lazily (one object shared with wrappers such as Lightning's
    ``LightningOptimizer``, which copy the optimizer's attributes).

    ``key`` is a tuple of ``(id, kind)`` per param, compared at each public call (a few list operations);
    when it differs the back end is resolved again from the params held now. A back end given
    at construction (``backend=``) or by the optimizer's ``bind_backend`` is pinned, and
    so is a detected one whose ``pin_when_detected`` is set (DeepSpeed's: its engine driver binds to that
    instance)."""

    def __init__(self, backend: Optional[Backend], process_group, model, pipeline_group=None) -> None:
        self.backend, self.pinned = backend, backend is not None
        self.process_group = process_group
        self.pipeline_group = pipeline_group
        self.stages_checked = False  # check_stages ran for this binding (at its first gradient evaluation)
        # a weak reference: the optimizer must not keep a DDP/FSDP model (and its gloo work) alive
        self._model = weakref.ref(model) if model is not None else None
        self.key: Optional[tuple] = None

    @property
    def model(self) -> Optional[torch.nn.Module]:
        return self._model() if self._model is not None else None

    def pin(self, backend: Backend) -> None:
        self.backend, self.pinned = backend, True
        self.stages_checked = False

    def check_stages(self, opt: Optimizer) -> None:
        """Once per binding: params of a multi-rank ``PipelineStage`` need ``pipeline_group=`` (else each
        stage would use its own part of the norm); skipped for a back end pinned without it."""
        if self.stages_checked:
            return
        self.stages_checked = True
        if self.pinned and self.pipeline_group is None:
            return
        from .pipeline import check_stages
        check_stages([p for g in opt.param_groups for p in g["params"]], self.pipeline_group)

    def resolve(self, opt: Optimizer) -> Backend:
        if self.pinned:
            return self.backend
        params = [p for g in opt.param_groups for p in g["params"]]
        key = tuple((id(p), param_kind(p)) for p in params)
        if key == self.key and self.backend is not None:
            return self.backend
        if self.key is not None:
            self._carry_state(opt, params)
        backend = resolve_backend(params, process_group=self.process_group, model=self.model,
                                  pipeline_group=self.pipeline_group)
        self.backend, self.key, self.stages_checked = backend, key, False
        if backend.pin_when_detected:
            self.pinned = True
        return backend

    def _carry_state(self, opt: Optimizer, params: List[Tensor]) -> None:
        """The params changed since the last binding: move each stateful param's state to the param
        now at its place when that is the same tensor in another object (same kind, shape and
        device, not sharded); refuse when the state was made for a tensor of another kind (a full tensor now
        sharded, or the reverse), which would silently mix layouts."""
        by_id = {id(q): q for q in opt.state}
        for (old_id, old_kind), p in zip(self.key, params):
            old = by_id.get(old_id)
            if old is None or "z" not in opt.state[old]:
                continue
            if old is p and old_kind == param_kind(p):
                continue
            z = opt.state[old]["z"]
            if (old_kind == param_kind(p) and not any(old_kind[1:]) and not callable(getattr(p, "to_local", None))
                    and z.shape == p.shape and z.device == p.device):
                opt.state[p] = opt.state.pop(old)
                continue
            raise RuntimeError(
                "AdamWMSAMScheduleFree: the parameters were wrapped or replaced (FSDP, fully_shard, "
                "accelerator.prepare, ...) after the optimizer state was created, so the state no longer matches "
                "them; wrap the model before the first step() (building the optimizer before wrapping is fine), "
                "or save the state with torch.distributed.checkpoint and load it into the wrapped optimizer")

    def refuse_unbound_step(self, opt: Optimizer) -> None:
        """Raise if an engine's optimizer wrapper is running ``opt.step()`` without having bound it (a
        DeepSpeed ZeRO wrapper without ``sharded_msam_sf.deepspeed.attach``: the step would compute
        ``||m||`` per rank and per group; :func:`~.zero.refuse_unbound_zero`). Looked for only when
        ``deepspeed`` is imported."""
        if "deepspeed" in sys.modules:
            from .zero import refuse_unbound_zero
            refuse_unbound_zero(opt)
