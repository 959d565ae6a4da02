"""AdamWMSAMScheduleFree: Schedule-Free AdamW with a Momentum-SAM ascent.

The math is ``ALGORITHM.md`` (summarised in :mod:`sharded_msam_sf.kernels`, the only place
it is written); this class holds the state, checks the calls, and runs the mode machine:

=====================  ==============================================  ===========================================
call                   one_pass (MSAM, default)                        two_pass (SAM-style, the seed's loop)
=====================  ==============================================  ===========================================
``train()``            x→y, re-apply the current ascent ``s·m``        x→y
forward/backward       at ``ỹ = y + s·m``, ``s = −ρ/||m||``            first pass at ``y``
``move_to_ascent()``   no-op (already at ỹ); error without grads       fold g0 into m, clear grads, ``s = +ρ/||m||``
``move_from_ascent()`` remove the ascent (p back to y)                 remove the ascent
``step()``             remove, fold g into m, update, apply new ascent update with g = ∇f(ỹ); m untouched
``eval()``             remove the ascent, y→x                          y→x
=====================  ==============================================  ===========================================

State per parameter: ``z`` (base sequence), ``exp_avg_sq`` (``v``) and, in groups
with ``rho > 0``, ``exp_avg`` (the MSAM momentum ``m``) — fp32 for bf16/fp16
params. Per group (saved by ``state_dict()``): the step counter ``k``, the
averaging sums ``weight_sum``/``lr_max``, ``train_mode``, ``ascent_scale`` (the
``s`` computed once per ascent, so removal subtracts exactly what was added),
``at_ascent``, ``ascent_taken`` (two_pass: ``move_to_ascent()`` ran since the last step),
``skipped_steps`` and ``v_overflow_steps``.

Calls in the wrong order raise a ``RuntimeError`` that says what to call: ``step()`` in
eval mode; in two_pass, ``step()`` with ``rho > 0`` and no ``move_to_ascent()`` since the
last step, and ``move_to_ascent()`` twice. ``eval()`` between ``move_to_ascent()`` and
``step()`` (two_pass) abandons that ascent: the params go to x, m keeps the folded
first gradient, and after ``train()`` the next ``step()`` needs a new
``move_to_ascent()``. A param group added after ``train()`` joins in train mode.
Hyperparameters are checked (:mod:`sharded_msam_sf.hyperparams`) at construction, in
``add_param_group``, in ``load_state_dict`` and again at every ``step()``.

The optimizer never calls ``torch.distributed``: the back end (chosen from the
params, see :mod:`sharded_msam_sf.backends`) reduces one small tensor per
gradient evaluation — the groups' sums of squares of ``m`` and a non-finite flag.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import hyperparams as H
from . import save_guards
from . import kernels as K
from .backends import Backend, resolve_backend
from .backends.binding import Binding
from .hyperparams import SAM_MODES, default_rho
from .kernels.abstract import host_values, meta_params_allowed
from .kernels.rules import decode_flag, encode_flags

__all__ = ["AdamWMSAMScheduleFree", "SAM_MODES", "default_rho"]

_STATE_KEYS = ("z", "exp_avg_sq", "exp_avg")
# the per-group counters and mode flags, besides the hyperparameters (saved by state_dict())
_COUNTERS = dict(k=0, train_mode=False, weight_sum=0.0, lr_max=-1.0, ascent_scale=0.0, at_ascent=False)
# later additions: filled in with these defaults when an older checkpoint lacks them
_OPTIONAL_COUNTERS = dict(scheduled_lr=0.0, skipped_steps=0, skip_pending=False, ascent_taken=False,
                          v_overflow_steps=0)


def _state_dtype(p: Tensor, state_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    if state_dtype is not None:  # the group's state_dtype (bf16: stochastically rounded state)
        return state_dtype
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def _scalar(v: Any) -> float:
    return float(v.item() if isinstance(v, Tensor) else v)


def _local_values(t: Tensor) -> Tensor:
    """The values this process holds of ``t`` (a DTensor's local shard, else ``t``)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class AdamWMSAMScheduleFree(Optimizer):
    r"""Schedule-Free AdamW with a Momentum-SAM ascent (AdamW-MSAM-ScheduleFree).

    Args (defaults and valid values: :mod:`sharded_msam_sf.hyperparams`):
        params: parameters or param groups (each group may set its own values below);
            floating point, each at most once; complex params are refused (v would take
            ``g·g``, not ``|g|²``: view them as real pairs with ``torch.view_as_real``).
        lr (float): γ, the peak learning rate; no schedule is needed (default 0.0025).
        betas (tuple): (β1, β2): β1 the interpolation weight of y, β2 the second-moment
            decay (default (0.9, 0.999)).
        eps (float): added outside the square root (default 1e-8).
        weight_decay (float): λ, decoupled, applied at y (default 0).
        warmup_steps (int): linear warm-up of γ over this many steps (default 0).
        r (float): polynomial weighting power of the average (default 0).
        weight_lr_power (float): p in the averaging weight ``γ_max^p`` (default 2).
        rho (float or None): ρ, the global L2 radius of the ascent; None gives 1.0 in
            one_pass and 0.05 in two_pass; 0 gives plain Schedule-Free AdamW.
        ascent_beta (float or None): β_m, the decay of the momentum m; None means β1.
        sam_mode (str): ``"one_pass"`` (MSAM: one gradient per step, taken at
            ``y − ρ·m/||m||``) or ``"two_pass"`` (the seed's loop: the ascent
            ``y + ρ·m/||m||`` after folding the first gradient into m).
        foreach (bool or None): use the ``torch._foreach_*`` multi-tensor path
            (None: yes).
        fused (bool or None): the fused step (:mod:`sharded_msam_sf.kernels`: compiled
            kernels, one stats pass and one update pass per tensor). None (default): fused
            for tensors of at least 262144 elements when ``foreach`` is not given and
            compilation is available (else foreach, with one warning); True: every tensor,
            an error if compilation is unavailable; False: the ``foreach`` choice. A compile
            failure disables the fused kernels of this optimizer only, on that device type.
        state_dtype (torch.dtype or None): dtype of z, v, m. None: fp32 for bf16/fp16
            params, the param dtype otherwise; ``torch.bfloat16`` halves the optimizer
            memory, with stochastic rounding (see docs/performance.md for its effect).
        backend: a :class:`~sharded_msam_sf.backends.Backend`, pinned; None detects it from the
            params (plain tensors / DDP, FSDP2 DTensors, FSDP1 flat params), at construction and
            again at the first use after they changed identity or kind (late binding: an
            optimizer built before FSDP wraps the model, or before ``accelerate.prepare``).
        process_group: the group that reduces the norm, overriding the detected one
            (with plain params: all-reduce the stats over it, as for DDP).
        model: the wrapped model (DDP / FSDP1 / FSDP2), to find the engine's modules
            without searching (see :func:`~sharded_msam_sf.backends.resolve_backend`).
        pipeline_group: under pipeline parallelism (``torch.distributed.pipelining``, one
            optimizer per stage), the process group over this rank's pipeline stages
            (``world_mesh["pp"].get_group()``, the group given to ``PipelineStage``); the norm
            of m and the NaN flag then add up over all stages (one all-reduce per gradient
            evaluation, :mod:`sharded_msam_sf.backends.pipeline`), and ``process_group``, if
            given, is the group of that all-reduce. **Required** for a stage of a multi-rank
            pipeline: without it each stage would scale its ascent by its own part of the norm
            (raised for params of a live ``PipelineStage``, not detectable otherwise).

    Call ``train()`` before training and ``eval()`` before evaluating or saving
    weights for inference (the params then hold the averaged x).
    """

    def __init__(
        self,
        params,
        lr: float = H.DEFAULTS["lr"],
        betas: Tuple[float, float] = H.DEFAULTS["betas"],
        eps: float = H.DEFAULTS["eps"],
        weight_decay: float = H.DEFAULTS["weight_decay"],
        warmup_steps: int = H.DEFAULTS["warmup_steps"],
        r: float = H.DEFAULTS["r"],
        weight_lr_power: float = H.DEFAULTS["weight_lr_power"],
        rho: Optional[float] = H.DEFAULTS["rho"],
        ascent_beta: Optional[float] = H.DEFAULTS["ascent_beta"],
        sam_mode: str = H.DEFAULTS["sam_mode"],
        foreach: Optional[bool] = H.DEFAULTS["foreach"],
        *,
        backend: Optional[Backend] = None,
        fused: Optional[bool] = H.DEFAULTS["fused"],
        state_dtype: Optional[torch.dtype] = H.DEFAULTS["state_dtype"],
        process_group=None,
        model: Optional[torch.nn.Module] = None,
        pipeline_group=None,
    ) -> None:
        hyper = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
            weight_decay=weight_decay, warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
            rho=rho, ascent_beta=ascent_beta, sam_mode=sam_mode, foreach=foreach,
            fused=fused, state_dtype=state_dtype,
        )
        H.validate(hyper)
        # counters and mode (schedulefree's names where they overlap)
        defaults = dict(hyper, **_COUNTERS, **_OPTIONAL_COUNTERS)
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Tensors or dicts, not a single Tensor")
        params = list(params)
        self._fused_state = K.FusedState()   # this optimizer's compile failures (see kernels)
        self._validated: Dict[int, tuple] = {}   # id(group) -> the hyperparameters last validated
        super().__init__(params, defaults)
        self._mode = self.param_groups[0]["sam_mode"]
        if backend is not None:  # type check now; with pipeline_group= wrapped to span the stages
            backend = resolve_backend([p for g in self.param_groups for p in g["params"]], backend=backend,
                                      pipeline_group=pipeline_group, process_group=process_group)
        # resolved now (errors early), and again at the first use after the params changed identity or
        # kind (late binding: wrapped by FSDP after construction, swapped by accelerator.prepare)
        self._binding = Binding(backend, process_group, model, pipeline_group)
        self._bind()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_fused_state", K.FusedState())
        self.__dict__.setdefault("_validated", {})
        self.__dict__.setdefault("_binding", Binding(None, None, None, None))

    # ------------------------------------------------------------------ late binding
    @property
    def _backend(self) -> Backend:
        """The back end bound by the last :meth:`_bind` (each public entry point binds first, so the
        per-param check runs once per call, not at every use inside it)."""
        b = self._binding.backend
        return b if b is not None else self._binding.resolve(self)

    def _bind(self) -> None:
        self._binding.resolve(self)

    def bind_backend(self, backend: Backend) -> None:
        """Bind ``backend`` for good, as ``backend=`` at construction does (no re-resolution when the
        params change later): the hook for engines that bind the optimizer after building it."""
        self._binding.pin(resolve_backend((), backend=backend, pipeline_group=self._binding.pipeline_group))

    def state_dict(self) -> Dict[str, Any]:
        """torch's ``state_dict``, after the registered :mod:`sharded_msam_sf.save_guards` (a transformers
        Trainer that saves it in train mode without ScheduleFreeCallback gets a warning: its model files hold
        y; see integrations/hf_guard.py)."""
        save_guards.run(self)
        return super().state_dict()

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's ``add_param_group``, plus: floating point params only, each once; the
        hyperparameters validated; one sam_mode for all groups; a group added after
        ``train()`` joins in train mode (its params have no state yet, so they hold y)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        H.check_group_keys(param_group)
        ps = param_group.get("params")
        if ps is not None and not isinstance(ps, set):
            ps = param_group["params"] = [ps] if isinstance(ps, Tensor) else list(ps)
            if len({id(p) for p in ps}) != len(ps):
                raise ValueError("optimizer contains a parameter group with duplicate parameters "
                                 "(each would be updated twice per step): pass each parameter once")
            for p in ps:
                if isinstance(p, Tensor) and p.is_complex():
                    raise ValueError(f"can't optimize a complex Tensor (dtype {p.dtype}): the second moment would "
                                     "take g·g instead of |g|²; store it as real pairs (torch.view_as_real)")
                if isinstance(p, Tensor) and not p.is_floating_point():
                    raise ValueError(f"can't optimize a Tensor of dtype {p.dtype}: AdamWMSAMScheduleFree "
                                     "needs floating point parameters")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            if isinstance(group["betas"], list):
                group["betas"] = tuple(group["betas"])
            H.validate(group)
            group["rho"] = H.resolved_rho(group["rho"], group["sam_mode"])
            modes = {g["sam_mode"] for g in self.param_groups}
            if len(modes) > 1:
                raise ValueError(f"Invalid sam_mode: all param groups must use the same sam_mode, got {sorted(modes)}")
        except ValueError:
            self.param_groups.pop()
            raise
        bad = H.extreme(group)
        if bad:
            warnings.warn(f"AdamWMSAMScheduleFree: param group {len(self.param_groups) - 1} has {', '.join(bad)}: "
                          "valid, but far outside what trains; expect the params to overflow and the steps to be "
                          "skipped (weight_decay: y is multiplied by 1 - lr*weight_decay every step)",
                          RuntimeWarning, stacklevel=3)
        if len(self.param_groups) > 1:
            group["train_mode"] = self.param_groups[0]["train_mode"]

    def _check_groups(self, where: str) -> None:
        """The hyperparameters again (``param_groups`` may have been edited since construction);
        a group whose values equal the ones last validated is not checked twice."""
        for i, group in enumerate(self.param_groups):
            snapshot = tuple(map(group.get, H.DEFAULTS))
            if not isinstance(group["lr"], Tensor) and self._validated.get(id(group)) == snapshot:
                continue
            try:
                H.validate(group)
            except ValueError as e:
                raise ValueError(f"{e} in param_groups[{i}] (checked by {where})") from None
            if group["sam_mode"] != self._mode:
                raise ValueError(f"Invalid sam_mode: param_groups[{i}] has {group['sam_mode']!r} but this optimizer "
                                 f"runs {self._mode!r}; the mode cannot change after construction (build a new one)")
            if group["rho"] is None:
                group["rho"] = default_rho(group["sam_mode"])
            self._validated[id(group)] = tuple(map(group.get, H.DEFAULTS))

    @property
    def backend(self) -> Backend:
        """The back end for the params held now: resolved on first use, again after they changed."""
        return self._binding.resolve(self)

    @property
    def sam_mode(self) -> str:
        return self.defaults["sam_mode"] if not self.param_groups else self.param_groups[0]["sam_mode"]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient held NaN/inf on some rank."""
        return max((g["skipped_steps"] for g in self.param_groups), default=0)

    @property
    def v_overflow_steps(self) -> int:
        """Steps in which a finite gradient's square overflowed, making v inf for those elements."""
        return max((g.get("v_overflow_steps", 0) for g in self.param_groups), default=0)

    @staticmethod
    def _beta_m(group: Dict[str, Any]) -> float:
        return group["betas"][0] if group["ascent_beta"] is None else group["ascent_beta"]

    def _foreach(self, group: Dict[str, Any]) -> bool:
        return True if group["foreach"] is None else group["foreach"]

    def _impl(self, group: Dict[str, Any]) -> str:
        """The group's kernels (``kernels.IMPLS``): fused, auto (fused where it pays), foreach, single."""
        fused = group.get("fused")
        if fused:
            return "fused"
        if fused is None and group["foreach"] is None:
            return "auto"
        return "foreach" if self._foreach(group) else "single"

    def _uses_ascent(self, group: Dict[str, Any]) -> bool:
        return group["rho"] > 0.0

    def _ascent_scale(self, group: Dict[str, Any], norm: float) -> float:
        """``s`` of the next ascent: ``−ρ/||m||`` in one_pass (MSAM looks ahead along −m),
        ``+ρ/||m||`` in two_pass (SAM climbs the smoothed current gradient); 0 if ||m|| = 0."""
        sign = -1.0 if group["sam_mode"] == "one_pass" else 1.0
        return K.ascent_scale(group["rho"], sign, norm)

    # ------------------------------------------------------------------ state
    def _init_state(self, p: Tensor, with_m: bool, state_dtype: Optional[torch.dtype] = None) -> Dict[str, Tensor]:
        state = self.state[p]
        if "z" not in state:
            if p.device.type == "meta" and not meta_params_allowed():  # (a dry run allows them)
                raise RuntimeError("can't step a parameter on the meta device (it holds no data): materialize the "
                                   "model first (e.g. model.to_empty(device=...) and initialise its weights)")
            dtype = _state_dtype(p, state_dtype)
            state["z"] = p.detach().clone(memory_format=torch.preserve_format).to(dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if with_m and "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(state["z"], memory_format=torch.preserve_format)
        return state

    def _stateful(self, group: Dict[str, Any]) -> List[Tensor]:
        return [p for p in group["params"] if "z" in self.state.get(p, {})]

    def _with_m(self, group: Dict[str, Any]) -> List[Tensor]:
        return [p for p in group["params"] if "exp_avg" in self.state.get(p, {})]

    def _loc(self, ts) -> List[Tensor]:
        return [self._backend.local(t) for t in ts]

    def _ms(self, ps) -> List[Tensor]:
        return [self._backend.local(self.state[p]["exp_avg"]) for p in ps]

    def _shift(self, group: Dict[str, Any], scale: float) -> None:
        """``p ← p + scale·m`` for every param of the group that has a momentum."""
        ps = self._with_m(group)
        K.add_scaled_(self._loc(ps), self._ms(ps), scale, impl=self._impl(group), state=self._fused_state)

    def _swap(self, group: Dict[str, Any], weight: float) -> None:
        """``p ← lerp(p, z, weight)`` for every param of the group that has state."""
        ps = self._stateful(group)
        zs = [self._backend.local(self.state[p]["z"]) for p in ps]
        K.swap_y_x_(self._loc(ps), zs, weight, impl=self._impl(group))

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's loader, after checking that ``state_dict`` is this optimizer's, in the same
        ``sam_mode`` with the same ``rho`` and ``state_dtype``, with valid hyperparameters,
        complete finite state of the params' shapes (a ``ValueError`` naming what differs
        otherwise). Then the state of bf16/fp16 params is put back in its own dtype from the
        saved tensors (torch's loader casts float state to the param dtype)."""
        self._check_loadable(state_dict)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, default in _OPTIONAL_COUNTERS.items():
                group.setdefault(key, default)
        saved = state_dict["state"]
        ids = (pid for g in state_dict["param_groups"] for pid in g["params"])
        params = ((p, g.get("state_dtype")) for g in self.param_groups for p in g["params"])
        for pid, (p, sdt) in zip(ids, params):
            if pid not in saved or _state_dtype(p, sdt) == p.dtype:
                continue
            for key in _STATE_KEYS:
                value = saved[pid].get(key)
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, dtype=_state_dtype(p, sdt), copy=True)

    def _check_loadable(self, sd: Any) -> None:
        where = "loaded state dict"
        if not isinstance(sd, dict):
            raise TypeError(f"{where}: expected a dict, got {type(sd).__name__}")
        for key in ("state", "param_groups"):
            if key not in sd:
                raise ValueError(f"{where} is missing the key {key!r} (found {sorted(sd)})")
        groups, state = sd["param_groups"], sd["state"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{where} has a different number of parameter groups ({len(groups)}, "
                             f"this optimizer has {len(self.param_groups)})")
        required = tuple(H.DEFAULTS) + tuple(_COUNTERS)
        for i, (g, sg) in enumerate(zip(self.param_groups, groups)):
            missing = [k for k in required if k not in sg]
            if missing:
                hint = (" (it looks like torch.optim.AdamW's)" if "amsgrad" in sg else
                        " (it looks like schedulefree's)" if "weight_sum" in sg and "sam_mode" not in sg else "")
                raise ValueError(f"{where}: param_groups[{i}] lacks {missing}: not a state dict of "
                                 f"AdamWMSAMScheduleFree{hint}")
            try:
                H.validate(sg)
            except ValueError as e:
                raise ValueError(f"{where}: param_groups[{i}]: {e}") from None
            if sg["sam_mode"] != g["sam_mode"]:
                raise ValueError(f"{where}: param_groups[{i}] has sam_mode={sg['sam_mode']!r} but this optimizer "
                                 f"runs sam_mode={g['sam_mode']!r}; build it with sam_mode={sg['sam_mode']!r} to "
                                 "resume (the mode is not switched silently)")
            rho = H.resolved_rho(sg["rho"], sg["sam_mode"])
            if rho != g["rho"]:
                raise ValueError(f"{where}: param_groups[{i}] has rho={rho} but this optimizer has rho={g['rho']}; "
                                 f"build it with rho={rho} to resume")
            if sg["state_dtype"] != g["state_dtype"]:
                raise ValueError(f"{where}: param_groups[{i}] has state_dtype={sg['state_dtype']} but this optimizer "
                                 f"has state_dtype={g['state_dtype']}; build it with the saved state_dtype")
            for key in ("weight_sum", "lr_max", "ascent_scale"):
                if not (isinstance(sg[key], (int, float)) and math.isfinite(sg[key])):
                    raise ValueError(f"{where}: param_groups[{i}][{key!r}] is {sg[key]!r}, not a finite number")
            if len(sg["params"]) != len(g["params"]):
                continue  # torch's loader names this mismatch
            need = ("z", "exp_avg_sq") + (("exp_avg",) if sg["sam_mode"] == "one_pass" and rho > 0 else ())
            for pid, p in zip(sg["params"], g["params"]):
                st = state.get(pid)
                if st is None:
                    continue
                lacking = [k for k in need if k not in st]
                if lacking:
                    raise ValueError(f"{where}: the state of param {pid} (param_groups[{i}]) lacks {lacking} "
                                     f"(has {sorted(st)}): not a state of AdamWMSAMScheduleFree in {sg['sam_mode']}")
                for key in _STATE_KEYS:
                    if key not in st:
                        continue
                    v = st[key]
                    if not isinstance(v, Tensor):
                        raise ValueError(f"{where}: state {key!r} of param {pid} is a {type(v).__name__}, not a Tensor")
                    if tuple(v.shape) != tuple(p.shape):
                        raise ValueError(f"{where}: state {key!r} of param {pid} (param_groups[{i}]) has shape "
                                         f"{tuple(v.shape)} but the param has shape {tuple(p.shape)}")
                    local = _local_values(v)
                    if local.numel() and not bool(torch.isfinite(local).all()):
                        raise ValueError(f"{where}: state {key!r} of param {pid} (param_groups[{i}]) holds NaN/inf")

    # ------------------------------------------------------------------ modes
    def require_train(self, call: str) -> None:
        """Raise ``RuntimeError`` naming ``call`` (e.g. ``"step()"``) unless every param group is in
        train mode. Every training entry point (``step``, ``move_to_ascent``, ``move_from_ascent``,
        ``skip_step``) checks it first; a wrapper that reaches the optimizer by another path (the
        DeepSpeed facade's ``move_to_ascent()``, which runs through the engine's ZeRO step) calls
        it to give the same error."""
        if not all(g["train_mode"] for g in self.param_groups):
            raise RuntimeError(f"{call} was called in eval mode: call optimizer.train() before training "
                               "(and optimizer.eval() before evaluating)")

    @torch.no_grad()
    def eval(self) -> None:
        """Remove the ascent and move the params to the averaged x (``y → x``). In two_pass,
        an ascent taken by ``move_to_ascent()`` is abandoned: the next ``step()`` needs a new one."""
        self._bind()  # late binding: before any state is created for these params
        changed = False
        for group in self.param_groups:
            if not group["train_mode"]:
                continue
            if group["at_ascent"]:
                self._shift(group, -group["ascent_scale"])
                group["at_ascent"] = False
            if group["sam_mode"] == "two_pass":
                group["ascent_scale"] = 0.0
                group["ascent_taken"] = False
                group["skip_pending"] = False
            self._swap(group, 1.0 - 1.0 / group["betas"][0])
            group["train_mode"] = False
            changed = True
        if changed:
            self._backend.params_changed()

    @torch.no_grad()
    def train(self) -> None:
        """Move the params to y (``x → y``); in one_pass also re-apply the current ascent."""
        self._bind()  # late binding: before any state is created for these params
        changed = False
        for group in self.param_groups:
            if group["train_mode"]:
                continue
            self._swap(group, 1.0 - group["betas"][0])
            if group["sam_mode"] == "one_pass" and group["k"] > 0:
                self._shift(group, group["ascent_scale"])
                group["at_ascent"] = True
            group["train_mode"] = True
            changed = True
        if changed:
            self._backend.params_changed()

    def _has_grads(self) -> bool:
        return any(p.grad is not None for g in self.param_groups for p in g["params"])

    @torch.no_grad()
    def move_to_ascent(self) -> None:
        """Two-pass mode: fold the current gradient into m, clear the gradients and move
        the params to ``ỹ = y + ρ·m/||m||``. One-pass mode: the params already sit at
        the ascent point; this only checks that a gradient was taken there."""
        self._bind()  # late binding: before any state is created for these params
        self.require_train("move_to_ascent()")
        if not self._has_grads():
            self._binding.refuse_unbound_ascent(self)  # an engine holds the gradients (DeepSpeed without attach)
        self._check_groups("move_to_ascent()")
        if not self._has_grads():
            raise RuntimeError("move_to_ascent() needs the gradients of a first backward pass: "
                               "call loss.backward() (engine.backward(loss) under DeepSpeed) first")
        if self.sam_mode == "one_pass":
            return
        if any(g["at_ascent"] or g["ascent_taken"] for g in self.param_groups):
            raise RuntimeError("move_to_ascent() was called twice: after it, run the second backward pass, "
                               "then call move_from_ascent() and step()")
        stats, parts = self._collect_stats(fold=True)
        self._backend.all_reduce_(stats)
        norm, skip, _ = self._read(stats)   # (v takes the second gradient: its overflow is step()'s)
        for gi, group in enumerate(self.param_groups):
            group["at_ascent"] = True
            group["ascent_taken"] = True
            group["ascent_scale"] = 0.0
            if skip:
                group["skip_pending"] = True
                continue
            if not self._uses_ascent(group):
                continue
            active, _inactive = parts[gi]
            K.fold_momentum_(self._ms(active), self._loc(p.grad for p in active), self._beta_m(group),
                             impl=self._impl(group), step=group["k"], state=self._fused_state)
            group["ascent_scale"] = self._ascent_scale(group, norm)
        if skip:
            self._warn_skip("move_to_ascent()")
        self.zero_grad(set_to_none=True)
        for group in self.param_groups:
            self._shift(group, group["ascent_scale"])
        self._backend.params_changed()

    @torch.no_grad()
    def move_from_ascent(self) -> None:
        """Remove the ascent: the params return to y (exactly ``p − s·m`` with the same s, m)."""
        self._bind()  # late binding: before any state is created for these params
        self.require_train("move_from_ascent()")
        if self.sam_mode == "two_pass" and not any(g["at_ascent"] for g in self.param_groups):
            raise RuntimeError("move_from_ascent() without move_to_ascent(): in two_pass mode call "
                               "move_to_ascent() after the first backward pass")
        changed = False
        for group in self.param_groups:
            if group["at_ascent"]:
                self._shift(group, -group["ascent_scale"])
                group["at_ascent"] = False
                changed = True
        if changed:
            self._backend.params_changed()

    # ------------------------------------------------------------------ step
    def _active(self, group: Dict[str, Any], with_m: bool) -> Tuple[List[Tensor], List[Tensor]]:
        """(params with a gradient — state created —, params with momentum but no gradient)."""
        active = [p for p in group["params"] if p.grad is not None]
        for p in active:
            if p.grad.is_sparse:
                raise RuntimeError("AdamWMSAMScheduleFree does not support sparse gradients")
            self._init_state(p, with_m, group.get("state_dtype"))
        ids = {id(p) for p in active}
        inactive = [p for p in self._with_m(group) if id(p) not in ids] if with_m else []
        return active, inactive

    def _collect_stats(self, fold: bool) -> Tuple[Tensor, List[Tuple[List[Tensor], List[Tensor]]]]:
        """One float64 tensor ``[sumsq_0, …, sumsq_{G−1}, flag]`` and each group's params.

        ``fold``: ``sumsq_i`` is of the momentum after folding in the current gradient;
        otherwise only the gradient flags are computed. ``flag`` carries both gradient flags
        in one scalar (:func:`sharded_msam_sf.kernels.rules.encode_flags`: inf if some gradient
        is NaN/inf, else > 0 if some finite g² overflowed), so the stats stay G + 1 values."""
        self._binding.check_stages(self)
        rows, parts = [], []
        for group in self.param_groups:
            with_m = fold and self._uses_ascent(group)
            active, inactive = self._active(group, with_m)
            parts.append((active, inactive))
            rows.append(self._group_stats(group, active, inactive, with_m))
        if not rows:
            return torch.zeros(1, dtype=torch.float64), parts
        stacked = torch.stack(rows)
        stats = torch.cat([stacked[:, 0], encode_flags(stacked[:, 1:].amax(0)).reshape(1)])
        return stats, parts

    def _group_stats(self, group: Dict[str, Any], active: List[Tensor], inactive: List[Tensor],
                     with_m: bool) -> Tensor:
        """One group's local ``[sumsq, nonfinite, v_overflow]``. Under a ``weighted`` reduction (params
        of different replica counts, e.g. tensor parallelism) each piece's sum of squares is divided
        by its replica count here, before the one all-reduce (:mod:`sharded_msam_sf.backends.base`)."""
        impl, st, beta_m = self._impl(group), self._fused_state, self._beta_m(group)
        if not self._backend.reduction.weighted:
            row = K.ascent_stats(self._ms(active) if with_m else [], self._loc(p.grad for p in active),
                                 beta_m=beta_m, impl=impl, state=st)
            if inactive:
                row = row + K.ascent_stats(self._ms(inactive), [], beta_m=None, impl=impl, state=st)
            return row
        pieces: Dict[int, Tuple[List[Tensor], List[Tensor], List[Tensor]]] = {}  # replicas -> (m, g, m w/o g)
        for p, has_grad in [(p, True) for p in active] + [(p, False) for p in inactive]:
            m = self._backend.local(self.state[p]["exp_avg"]).view(-1) if (with_m or not has_grad) else None
            g = self._backend.local(p.grad).view(-1) if has_grad else None
            for rng, replicas in self._backend.replica_pieces(p):
                ms, gs, idle = pieces.setdefault(replicas, ([], [], []))
                cut = (lambda t: t) if rng is None else (lambda t, a=rng[0], b=rng[1]: t[a:b])
                if has_grad:
                    gs.append(cut(g))
                    if m is not None:
                        ms.append(cut(m))
                else:
                    idle.append(cut(m))
        row = torch.zeros(3, dtype=torch.float64)
        for replicas, (ms, gs, idle) in pieces.items():
            part = K.ascent_stats(ms, gs, beta_m=beta_m, impl=impl, state=st)
            if idle:
                part = part + K.ascent_stats(idle, [], beta_m=None, impl=impl, state=st)
            row = row.to(part.device)
            row = row + torch.cat([part[:1] / replicas, part[1:]])
        return row

    def _read(self, stats: Tensor) -> Tuple[float, bool, bool]:
        """(the global ||m|| over the groups with rho > 0, nonfinite, v_overflow) from the
        reduced stats, with one device-to-host copy."""
        values = host_values(stats)  # (a placeholder for a dry run's fake/meta stats)
        # groups without the ascent add 0 (their m is not read), so all slots add up to the norm over the
        # groups with rho > 0; a back end may return the total in one slot (the pipeline back end does)
        sumsq = sum(values[:-1])
        norm = math.sqrt(sumsq) if sumsq > 0.0 else 0.0
        return (norm,) + decode_flag(values[-1])

    def _norm(self, stats: Tensor) -> float:
        """The global ||m|| over the groups with rho > 0, from the reduced stats."""
        return self._read(stats)[0]

    def _warn_skip(self, where: str) -> None:
        warnings.warn(f"AdamWMSAMScheduleFree: non-finite gradient (NaN/inf) on some rank in {where}; "
                      f"the step is skipped on every rank and the optimizer state is unchanged "
                      f"(skipped so far: {self.skipped_steps}){self._skip_cause()}", RuntimeWarning, stacklevel=3)

    def _note_v_overflow(self) -> None:
        for group in self.param_groups:
            group["v_overflow_steps"] = group.get("v_overflow_steps", 0) + 1
        warnings.warn("AdamWMSAMScheduleFree: a finite gradient's square overflowed in step(), so v = inf for "
                      "those elements and their update g/(sqrt(v)+eps) is 0 from now on (they stop moving); "
                      "scale the loss down or clip the gradients "
                      f"(steps with an overflow so far: {self.v_overflow_steps})", RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def skip_step(self, reason: str, *, ascent: bool = False) -> None:
        """Skip this step on an engine's decision, e.g. DeepSpeed's overflow check, which drops a
        non-finite gradient before this optimizer sees it. The state ends as if that gradient had
        reached the optimizer: ``ascent=False`` (in place of ``step()``): the skip is counted in
        ``skipped_steps`` and z, v, m, k are unchanged; two_pass also removes an ascent still in
        place. ``ascent=True`` (two_pass, in place of ``move_to_ascent()``): no ascent (s = 0), the
        gradients are dropped, and the coming ``step()`` is skipped and counted. No collective: the
        engine's decision must be the same on every rank. ``reason`` goes into the warning."""
        self._bind()  # late binding: before any state is created for these params
        self.require_train("skip_step()")
        if ascent and self.sam_mode != "two_pass":
            raise ValueError("skip_step(ascent=True) replaces a two_pass move_to_ascent(); this optimizer is one_pass")
        changed = False
        for group in self.param_groups:
            if ascent:  # in place of move_to_ascent(): the coming step() is the one skipped
                group["at_ascent"], group["ascent_scale"], group["skip_pending"] = True, 0.0, True
                group["ascent_taken"] = True
                continue
            if group["sam_mode"] == "two_pass":
                if group["at_ascent"]:
                    self._shift(group, -group["ascent_scale"])
                    group["at_ascent"], changed = False, True
                group["ascent_scale"], group["skip_pending"], group["ascent_taken"] = 0.0, False, False
            group["skipped_steps"] += 1
        if ascent:
            self.zero_grad(set_to_none=True)
        elif changed:
            self._backend.params_changed()
        what = "no ascent, the coming step() is skipped" if ascent else "step skipped"
        warnings.warn(f"AdamWMSAMScheduleFree: {what} ({reason}); the optimizer state is unchanged "
                      f"(skipped so far: {self.skipped_steps}){self._skip_cause()}", RuntimeWarning, stacklevel=2)

    def _skip_cause(self) -> str:
        """'; likely cause: ...' naming extreme hyperparameters (hyperparams.extreme), or ''."""
        causes = [f"group {i}: {', '.join(b)}" for i, g in enumerate(self.param_groups) if (b := H.extreme(g))]
        return f"; likely cause: {'; '.join(causes)}, which overflows the params (lower it)" if causes else ""

    @staticmethod
    def _schedule(group: Dict[str, Any]) -> Tuple[float, float, float]:
        """(γ_t, c_t, bc2) for the group's next step; updates lr_max, weight_sum, scheduled_lr."""
        k, warmup = group["k"], group["warmup_steps"]
        sched = (k + 1) / warmup if k < warmup else 1.0
        lr = _scalar(group["lr"]) * sched
        beta2 = group["betas"][1]
        bias_correction2 = 1.0 - beta2 ** (k + 1)
        group["scheduled_lr"] = lr
        lr_max = group["lr_max"] = max(lr, group["lr_max"])
        weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
        weight_sum = group["weight_sum"] = group["weight_sum"] + weight
        ckp1 = weight / weight_sum if weight_sum != 0.0 else 0.0
        return lr, ckp1, bias_correction2

    def _is_state_init_call(self) -> bool:
        """torch.distributed.checkpoint initialises an empty state by a step() with zero
        grads and lr = 0: that call creates the state and must not count as a step."""
        return (not self.state and bool(self.param_groups)
                and all(_scalar(g["lr"]) == 0.0 for g in self.param_groups))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One optimizer step (see the class table for what it does in each mode).

        ``closure`` (re-evaluates the loss and runs its backward, returns the loss): one_pass
        calls it once, at the ascent point. two_pass runs the whole SAM loop with it:
        ``zero_grad()``, closure at y, ``move_to_ascent()``, closure at the ascent point,
        ``move_from_ascent()``, update — the usual SAM closure convention (Lightning's automatic
        optimization). The first loss is returned. After a ``move_to_ascent()`` of the caller's own
        loop, two_pass calls the closure once, as torch's optimizers do (Lightning's manual
        optimization passes one that does nothing). A closure that leaves no gradient at all (e.g.
        Lightning's ``training_step`` returning None) makes no step."""
        self._bind()  # late binding: before any state is created for these params
        self._check_groups("step()")
        init_call = self._is_state_init_call()  # allowed in eval mode: DCP loads into a fresh optimizer
        if not init_call:  # (first: DeepSpeed's fp16 wrappers step it in deepspeed.initialize, in eval mode)
            self._binding.refuse_unbound_step(self)  # an engine's wrapper steps it unbound: wrong ||m||
            self.require_train("step()")
        loss = None
        if (closure is not None and not init_call and self.sam_mode == "two_pass"
                and not any(g["ascent_taken"] for g in self.param_groups)):
            return self._closure_sam_loop(closure)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if not init_call and not self._has_grads():
                return loss
        if init_call:
            for group in self.param_groups:
                self._active(group, self._uses_ascent(group))
            return loss
        if closure is None:
            self._check_some_gradient()
        if self.sam_mode == "one_pass":
            self._step_one_pass()
        else:
            self._step_two_pass()
        self._backend.params_changed()
        return loss

    def _check_some_gradient(self) -> None:
        """A step with no gradient on any param would still count a step and move the ascent: that is
        the trace of params the model no longer uses (e.g. FSDP1 ``use_orig_params=False`` wrapped after
        the optimizer was built), so it is refused. (A back end whose engine hands the gradients itself, ``hands_gradients``, is not checked.)"""
        if self._has_grads() or self._backend.hands_gradients:
            return
        if not any(g["params"] for g in self.param_groups):
            return
        raise RuntimeError(
            "step() found no gradient on any parameter: call loss.backward() before step(). If it was called, the "
            "optimizer holds parameters the model no longer uses: FSDP with use_orig_params=False (or another "
            "wrapper) replaced them after the optimizer was built; build the optimizer from the wrapped model's "
            "parameters, or use use_orig_params=True")

    def set_closure_replay(self, replay: Optional[Callable[[], Any]]) -> None:
        """two_pass ``step(closure)`` with gradient accumulation (Lightning's ``accumulate_grad_batches``):
        the params already hold the gradients of the step's earlier micro-batches, taken at y, and the
        closure runs the last one. The next ``step(closure)`` then keeps those gradients (no ``zero_grad()``
        before the first closure call), so ``move_to_ascent()`` folds g0 = their mean with the last one's
        into m, and at the ascent point it calls ``replay()`` (the earlier micro-batches' forward and
        backward again, each loss divided by the number of micro-batches as in the first pass) before the
        closure. Used by that one step; ``None`` clears it. See :mod:`sharded_msam_sf.accumulation`."""
        if replay is not None and not callable(replay):
            raise TypeError(f"set_closure_replay() takes a callable or None, got {type(replay).__name__}")
        self._closure_replay = replay

    def _closure_sam_loop(self, closure: Callable[[], Any]) -> Any:
        """two_pass ``step(closure)``: the SAM loop of :meth:`step`'s docstring (with the earlier micro-batches
        of :meth:`set_closure_replay` when one is set)."""
        replay, self._closure_replay = getattr(self, "_closure_replay", None), None
        if replay is None:
            self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        if not self._has_grads():
            return loss
        if any(self._uses_ascent(g) for g in self.param_groups):
            self.move_to_ascent()
            with torch.enable_grad():
                if replay is not None:
                    replay()
                closure()
            self.move_from_ascent()
        self._step_two_pass()
        self._backend.params_changed()
        return loss

    def _step_one_pass(self) -> None:
        stats, parts = self._collect_stats(fold=True)
        self._backend.all_reduce_(stats)
        norm, nonfinite, v_overflow = self._read(stats)
        if nonfinite:
            for group in self.param_groups:
                group["skipped_steps"] += 1
            self._warn_skip("step()")
            return
        if v_overflow:
            self._note_v_overflow()
        for gi, group in enumerate(self.param_groups):
            active, inactive = parts[gi]
            uses = self._uses_ascent(group)
            remove = group["ascent_scale"] if group["at_ascent"] else 0.0
            apply = self._ascent_scale(group, norm) if uses else 0.0
            if inactive:
                ps, ms, impl = self._loc(inactive), self._ms(inactive), self._impl(group)
                K.add_scaled_(ps, ms, -remove, impl=impl, state=self._fused_state)
                K.add_scaled_(ps, ms, apply, impl=impl, state=self._fused_state)
            lr, ckp1, bc2 = self._schedule(group)
            self._update(group, active, lr=lr, ckp1=ckp1, bc2=bc2, with_m=uses,
                         beta_m=self._beta_m(group), remove=remove, apply=apply)
            group["k"] += 1
            group["ascent_scale"] = apply
            group["at_ascent"] = True

    def _step_two_pass(self) -> None:
        if any(self._uses_ascent(g) for g in self.param_groups) and not any(g["ascent_taken"]
                                                                            for g in self.param_groups):
            raise RuntimeError("step() in two_pass mode without move_to_ascent() since the last step: after the "
                               "first backward pass call optimizer.move_to_ascent(), run the second backward pass, "
                               "then move_from_ascent() and step() (sam_mode='one_pass' takes one gradient per step)")
        for group in self.param_groups:  # the seed's loop calls move_from_ascent(); be forgiving
            if group["at_ascent"]:
                self._shift(group, -group["ascent_scale"])
                group["at_ascent"] = False
        stats, parts = self._collect_stats(fold=False)
        self._backend.all_reduce_(stats)
        _, nonfinite, v_overflow = self._read(stats)
        pending = any(g["skip_pending"] for g in self.param_groups)
        for group in self.param_groups:
            group["ascent_scale"] = 0.0
            group["skip_pending"] = False
            group["ascent_taken"] = False
        if nonfinite or pending:
            for group in self.param_groups:
                group["skipped_steps"] += 1
            self._warn_skip("step()")
            return
        if v_overflow:
            self._note_v_overflow()
        for gi, group in enumerate(self.param_groups):
            active, _ = parts[gi]
            lr, ckp1, bc2 = self._schedule(group)
            self._update(group, active, lr=lr, ckp1=ckp1, bc2=bc2, with_m=False, beta_m=None, remove=0.0, apply=0.0)
            group["k"] += 1

    def _update(self, group, active, *, lr, ckp1, bc2, with_m, beta_m, remove, apply) -> None:
        if not active:
            return
        st = [self.state[p] for p in active]
        b1, b2 = group["betas"]
        K.sf_adamw_update_(
            self._loc(active), self._loc(p.grad for p in active),
            [self._backend.local(s["z"]) for s in st], [self._backend.local(s["exp_avg_sq"]) for s in st],
            self._ms(active) if with_m else None,
            lr=lr, beta1=b1, beta2=b2, eps=group["eps"], weight_decay=group["weight_decay"], ckp1=ckp1,
            bias_correction2=bc2, beta_m=beta_m if with_m else None, remove_scale=remove,
            apply_scale=apply, impl=self._impl(group), step=group["k"], state=self._fused_state,
        )
