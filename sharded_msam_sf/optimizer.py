"""AdamWMSAMScheduleFree: Schedule-Free AdamW with a Momentum-SAM ascent.

The math is ``ALGORITHM.md`` (summarised in :mod:`sharded_msam_sf.functional`);
this class holds the state, checks the calls, and runs the mode machine:

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
``at_ascent`` and ``skipped_steps``.

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

from . import functional as F
from . import fused_compile as K
from .backends import Backend, resolve_backend

__all__ = ["AdamWMSAMScheduleFree", "SAM_MODES", "default_rho"]

SAM_MODES = ("one_pass", "two_pass")
_DEFAULT_RHO = {"one_pass": 1.0, "two_pass": 0.05}
_STATE_KEYS = ("z", "exp_avg_sq", "exp_avg")


def default_rho(sam_mode: str) -> float:
    """rho=None means 1.0 in one_pass (MSAM's AdamW default) and 0.05 in two_pass (SAM's)."""
    return _DEFAULT_RHO[sam_mode]


def _state_dtype(p: Tensor, state_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    if state_dtype is not None:  # the group's state_dtype (bf16: stochastically rounded state)
        return state_dtype
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def _check_range(name: str, value: Any, ok: bool, valid: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (valid: {valid})")


def _validate_group(group: Dict[str, Any]) -> None:
    lr = group["lr"]
    lr_value = lr.item() if isinstance(lr, Tensor) else lr
    _check_range("learning rate (lr)", lr_value, isinstance(lr_value, (int, float)) and math.isfinite(lr_value) and lr_value >= 0.0, "a finite number >= 0")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r} (valid: a pair (beta1, beta2))")
    b1, b2 = betas
    _check_range("beta parameter at index 0", b1, isinstance(b1, (int, float)) and 0.0 < b1 < 1.0,
                 "0 < beta1 < 1; beta1 = 0 is excluded because eval() recovers x from y and z by dividing by beta1")
    _check_range("beta parameter at index 1", b2, isinstance(b2, (int, float)) and 0.0 <= b2 < 1.0, "0 <= beta2 < 1")
    _check_range("epsilon value (eps)", group["eps"], isinstance(group["eps"], (int, float)) and group["eps"] >= 0.0, ">= 0")
    wd = group["weight_decay"]
    _check_range("weight_decay", wd, isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0.0, "a finite number >= 0")
    ws = group["warmup_steps"]
    _check_range("warmup_steps", ws, isinstance(ws, int) and not isinstance(ws, bool) and ws >= 0, "an integer >= 0")
    _check_range("r", group["r"], isinstance(group["r"], (int, float)) and math.isfinite(group["r"]) and group["r"] >= 0.0, "a finite number >= 0")
    wlp = group["weight_lr_power"]
    _check_range("weight_lr_power", wlp, isinstance(wlp, (int, float)) and math.isfinite(wlp) and wlp >= 0.0, "a finite number >= 0")
    mode = group["sam_mode"]
    _check_range("sam_mode", mode, mode in SAM_MODES, " or ".join(repr(m) for m in SAM_MODES))
    rho = group["rho"]
    _check_range("rho", rho, rho is None or (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0.0),
                 "None or a finite number >= 0 (0 gives plain Schedule-Free AdamW)")
    ab = group["ascent_beta"]
    _check_range("ascent_beta", ab, ab is None or (isinstance(ab, (int, float)) and 0.0 <= ab < 1.0), "None (= beta1) or 0 <= ascent_beta < 1")
    fe = group["foreach"]
    _check_range("foreach", fe, fe is None or isinstance(fe, bool), "None, True or False")
    fu = group.get("fused")
    _check_range("fused", fu, fu is None or isinstance(fu, bool), "None, True or False")
    if fu and fe:
        raise ValueError("Invalid fused/foreach: fused=True and foreach=True cannot be set together")
    sd = group.get("state_dtype")
    _check_range("state_dtype", sd, sd in (None, torch.float32, torch.bfloat16), "None, torch.float32 or torch.bfloat16")


class AdamWMSAMScheduleFree(Optimizer):
    r"""Schedule-Free AdamW with a Momentum-SAM ascent (AdamW-MSAM-ScheduleFree).

    Args:
        params: parameters or param groups (each group may set its own values below).
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
        fused (bool or None): the fused step (``fused_compile.py``: torch.compile'd kernels,
            one stats pass and one update pass per tensor). None (default): fused for
            tensors of at least 262144 elements when ``foreach`` is not given and compilation
            is available (else foreach, with one warning); True: every tensor, an error if
            compilation is unavailable; False: the ``foreach`` choice.
        state_dtype (torch.dtype or None): dtype of z, v, m. None: fp32 for bf16/fp16
            params, the param dtype otherwise; ``torch.bfloat16`` halves the optimizer
            memory, with stochastic rounding (see docs/performance.md for its effect).
        backend: a :class:`~sharded_msam_sf.backends.Backend`; None detects it from the
            params (plain tensors / DDP, FSDP2 DTensors, FSDP1 flat params).
        process_group: the group that reduces the norm, overriding the detected one
            (with plain params: all-reduce the stats over it, as for DDP).
        model: the wrapped model (DDP / FSDP1 / FSDP2), to find the engine's modules
            without searching (see :func:`~sharded_msam_sf.backends.resolve_backend`).

    Call ``train()`` before training and ``eval()`` before evaluating or saving
    weights for inference (the params then hold the averaged x).
    """

    def __init__(
        self,
        params,
        lr: float = 0.0025,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        rho: Optional[float] = None,
        ascent_beta: Optional[float] = None,
        sam_mode: str = "one_pass",
        foreach: Optional[bool] = None,
        *,
        backend: Optional[Backend] = None,
        fused: Optional[bool] = None,
        state_dtype: Optional[torch.dtype] = None,
        process_group=None,
        model: Optional[torch.nn.Module] = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
            weight_decay=weight_decay, warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
            rho=rho, ascent_beta=ascent_beta, sam_mode=sam_mode, foreach=foreach,
            fused=fused, state_dtype=state_dtype,
            # counters and mode (schedulefree's names where they overlap)
            k=0, train_mode=False, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0,
            ascent_scale=0.0, at_ascent=False, skipped_steps=0, skip_pending=False,
        )
        _validate_group(defaults)
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Tensors or dicts, not a single Tensor")
        params = list(params)
        super().__init__(params, defaults)
        self._backend = resolve_backend((p for g in self.param_groups for p in g["params"]), backend=backend,
                                        process_group=process_group, model=model)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
        _validate_group(group)
        if group["rho"] is None:
            group["rho"] = default_rho(group["sam_mode"])
        modes = {g["sam_mode"] for g in self.param_groups}
        if len(modes) > 1:
            raise ValueError(f"Invalid sam_mode: all param groups must use the same sam_mode, got {sorted(modes)}")

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def sam_mode(self) -> str:
        return self.defaults["sam_mode"] if not self.param_groups else self.param_groups[0]["sam_mode"]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient held NaN/inf on some rank."""
        return max((g["skipped_steps"] for g in self.param_groups), default=0)

    @staticmethod
    def _beta_m(group: Dict[str, Any]) -> float:
        return group["betas"][0] if group["ascent_beta"] is None else group["ascent_beta"]

    def _foreach(self, group: Dict[str, Any]) -> bool:
        return True if group["foreach"] is None else group["foreach"]

    def _impl(self, group: Dict[str, Any]) -> str:
        """The step's kernels (``fused_compile.IMPLS``): fused, auto (fused where it pays), foreach, single."""
        fused = group.get("fused")
        if fused:
            return "fused"
        if fused is None and group["foreach"] is None:
            return "auto"
        return "foreach" if self._foreach(group) else "single"

    def _uses_ascent(self, group: Dict[str, Any]) -> bool:
        return group["rho"] > 0.0

    # ------------------------------------------------------------------ state
    def _init_state(self, p: Tensor, with_m: bool, state_dtype: Optional[torch.dtype] = None) -> Dict[str, Tensor]:
        state = self.state[p]
        if "z" not in state:
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
        F.add_scaled_(self._loc(ps), self._ms(ps), scale, foreach=self._foreach(group))

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's loader casts float state to the param dtype; the state of bf16/fp16
        params is fp32, so it is put back from the saved (fp32) tensors afterwards."""
        super().load_state_dict(state_dict)
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

    # ------------------------------------------------------------------ modes
    def _require_train(self, call: str) -> None:
        if not all(g["train_mode"] for g in self.param_groups):
            raise RuntimeError(f"{call} was called in eval mode: call optimizer.train() before training "
                               "(and optimizer.eval() before evaluating)")

    @torch.no_grad()
    def eval(self) -> None:
        """Remove the ascent and move the params to the averaged x (``y → x``)."""
        changed = False
        for group in self.param_groups:
            if not group["train_mode"]:
                continue
            if group["at_ascent"]:
                self._shift(group, -group["ascent_scale"])
                group["at_ascent"] = False
                if group["sam_mode"] == "two_pass":
                    group["ascent_scale"] = 0.0
            ps = self._stateful(group)
            zs = [self._backend.local(self.state[p]["z"]) for p in ps]
            F.swap_y_x_(self._loc(ps), zs, 1.0 - 1.0 / group["betas"][0], foreach=self._foreach(group))
            group["train_mode"] = False
            changed = True
        if changed:
            self._backend.params_changed()

    @torch.no_grad()
    def train(self) -> None:
        """Move the params to y (``x → y``); in one_pass also re-apply the current ascent."""
        changed = False
        for group in self.param_groups:
            if group["train_mode"]:
                continue
            ps = self._stateful(group)
            zs = [self._backend.local(self.state[p]["z"]) for p in ps]
            F.swap_y_x_(self._loc(ps), zs, 1.0 - group["betas"][0], foreach=self._foreach(group))
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
        self._require_train("move_to_ascent()")
        if not self._has_grads():
            raise RuntimeError("move_to_ascent() needs the gradients of a first backward pass: "
                               "call loss.backward() (engine.backward(loss) under DeepSpeed) first")
        if self.sam_mode == "one_pass":
            return
        if any(g["at_ascent"] for g in self.param_groups):
            raise RuntimeError("move_to_ascent() was called twice: after it, run the second backward pass, "
                               "then call move_from_ascent() and step()")
        stats, parts = self._collect_stats(fold=True)
        self._backend.all_reduce_(stats)
        skip = bool(stats[-1].item() > 0)
        norm = self._norm(stats)
        for gi, group in enumerate(self.param_groups):
            group["at_ascent"] = True
            group["ascent_scale"] = 0.0
            if skip:
                group["skip_pending"] = True
                continue
            if not self._uses_ascent(group):
                continue
            active, _inactive = parts[gi]
            ms = self._ms(active)
            K.fold_momentum_(ms, self._loc(p.grad for p in active), self._beta_m(group), impl=self._impl(group),
                             step=group["k"])
            group["ascent_scale"] = F.ascent_scale(group["rho"], group.get("_ascent_sign", 1.0), norm)
        if skip:
            self._warn_skip("move_to_ascent()")
        self.zero_grad(set_to_none=True)
        for group in self.param_groups:
            self._shift(group, group["ascent_scale"])
        self._backend.params_changed()

    @torch.no_grad()
    def move_from_ascent(self) -> None:
        """Remove the ascent: the params return to y (exactly ``p − s·m`` with the same s, m)."""
        self._require_train("move_from_ascent()")
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
            self._init_state(p, with_m, group.get("state_dtype"))
        ids = {id(p) for p in active}
        inactive = [p for p in self._with_m(group) if id(p) not in ids] if with_m else []
        return active, inactive

    def _collect_stats(self, fold: bool) -> Tuple[Tensor, List[Tuple[List[Tensor], List[Tensor]]]]:
        """One float64 tensor ``[sumsq_0, …, sumsq_{G−1}, nonfinite]`` and each group's params.

        ``fold``: ``sumsq_i`` is of the momentum after folding in the current gradient;
        otherwise only the non-finite flag is computed."""
        rows, parts = [], []
        for group in self.param_groups:
            with_m = fold and self._uses_ascent(group)
            active, inactive = self._active(group, with_m)
            parts.append((active, inactive))
            grads = self._loc(p.grad for p in active)
            row = K.ascent_stats(self._ms(active) if with_m else [], grads,
                                 beta_m=self._beta_m(group), impl=self._impl(group))
            if inactive:
                row = row + K.ascent_stats(self._ms(inactive), [], beta_m=None, impl=self._impl(group))
            rows.append(row)
        if not rows:
            return torch.zeros(1, dtype=torch.float64), parts
        stacked = torch.stack(rows)
        stats = torch.cat([stacked[:, 0], stacked[:, 1].amax().reshape(1)])
        return stats, parts

    def _norm(self, stats: Tensor) -> float:
        """The global ||m|| over the groups with rho > 0, from the reduced stats."""
        sumsq = sum(float(stats[i]) for i, g in enumerate(self.param_groups) if self._uses_ascent(g))
        return math.sqrt(sumsq) if sumsq > 0.0 else 0.0

    def _warn_skip(self, where: str) -> None:
        warnings.warn(f"AdamWMSAMScheduleFree: non-finite gradient (NaN/inf) on some rank in {where}; "
                      f"the step is skipped on every rank and the optimizer state is unchanged "
                      f"(skipped so far: {self.skipped_steps})", RuntimeWarning, stacklevel=3)

    @staticmethod
    def _schedule(group: Dict[str, Any]) -> Tuple[float, float, float]:
        """(γ_t, c_t, bc2) for the group's next step; updates lr_max, weight_sum, scheduled_lr."""
        k, warmup = group["k"], group["warmup_steps"]
        sched = (k + 1) / warmup if k < warmup else 1.0
        lr = group["lr"].item() if isinstance(group["lr"], Tensor) else group["lr"]
        lr = lr * sched
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
        def lr0(g):
            lr = g["lr"]
            return float(lr.item() if isinstance(lr, Tensor) else lr) == 0.0
        return not self.state and bool(self.param_groups) and all(lr0(g) for g in self.param_groups)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One optimizer step (see the class table for what it does in each mode)."""
        init_call = self._is_state_init_call()  # allowed in eval mode: DCP loads into a fresh optimizer
        if not init_call:
            self._require_train("step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if init_call:
            for group in self.param_groups:
                self._active(group, self._uses_ascent(group))
            return loss
        if self.sam_mode == "one_pass":
            self._step_one_pass()
        else:
            self._step_two_pass()
        self._backend.params_changed()
        return loss

    def _step_one_pass(self) -> None:
        stats, parts = self._collect_stats(fold=True)
        self._backend.all_reduce_(stats)
        if stats[-1].item() > 0:
            for group in self.param_groups:
                group["skipped_steps"] += 1
            self._warn_skip("step()")
            return
        norm = self._norm(stats)
        for gi, group in enumerate(self.param_groups):
            active, inactive = parts[gi]
            uses = self._uses_ascent(group)
            remove = group["ascent_scale"] if group["at_ascent"] else 0.0
            apply = F.ascent_scale(group["rho"], -group.get("_ascent_sign", 1.0), norm) if uses else 0.0
            fe = self._foreach(group)
            if inactive:
                ps, ms = self._loc(inactive), self._ms(inactive)
                F.add_scaled_(ps, ms, -remove, foreach=fe)
                F.add_scaled_(ps, ms, apply, foreach=fe)
            lr, ckp1, bc2 = self._schedule(group)
            self._update(group, active, lr=lr, ckp1=ckp1, bc2=bc2, with_m=uses,
                         beta_m=self._beta_m(group), remove=remove, apply=apply)
            group["k"] += 1
            group["ascent_scale"] = apply
            group["at_ascent"] = True

    def _step_two_pass(self) -> None:
        for group in self.param_groups:  # the seed's loop calls move_from_ascent(); be forgiving
            if group["at_ascent"]:
                self._shift(group, -group["ascent_scale"])
                group["at_ascent"] = False
        stats, parts = self._collect_stats(fold=False)
        self._backend.all_reduce_(stats)
        pending = any(g["skip_pending"] for g in self.param_groups)
        for group in self.param_groups:
            group["ascent_scale"] = 0.0
            group["skip_pending"] = False
        if stats[-1].item() > 0 or pending:
            for group in self.param_groups:
                group["skipped_steps"] += 1
            self._warn_skip("step()")
            return
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
            apply_scale=apply, impl=self._impl(group), step=group["k"],
        )
