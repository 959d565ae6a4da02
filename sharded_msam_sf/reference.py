"""A plain, memory-hungry reference of ALGORITHM.md, written for reading, used as a test oracle.

It keeps the three sequences of "The Road Less Scheduled" explicitly — ``x`` (the
average, what eval sees), ``z`` (the base sequence) and ``y = (1 − β1)·z + β1·x``
(where the gradient is taken) — plus the MSAM momentum ``m`` and the second moment
``v``, one parameter at a time, no foreach, no sharding. The parameter tensor is
only a view for the model: it is *written* from x, y, z, m, never read back
(except at the first step, to start the sequences). Same API as
:class:`~sharded_msam_sf.AdamWMSAMScheduleFree`.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import Tensor

from . import hyperparams as H

__all__ = ["AdamWMSAMScheduleFreeReference"]


class AdamWMSAMScheduleFreeReference:
    """Reference AdamW-MSAM-ScheduleFree. Single process; params as a list or as groups."""

    def __init__(self, params, lr=H.DEFAULTS["lr"], betas=H.DEFAULTS["betas"], eps=H.DEFAULTS["eps"],
                 weight_decay=H.DEFAULTS["weight_decay"], warmup_steps=H.DEFAULTS["warmup_steps"], r=H.DEFAULTS["r"],
                 weight_lr_power=H.DEFAULTS["weight_lr_power"], rho=H.DEFAULTS["rho"],
                 ascent_beta=H.DEFAULTS["ascent_beta"], sam_mode=H.DEFAULTS["sam_mode"]) -> None:
        params = list(params)
        if params and not isinstance(params[0], dict):
            params = [{"params": params}]
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, rho=rho, ascent_beta=ascent_beta)
        H.validate(dict(defaults, sam_mode=sam_mode))
        self.sam_mode = sam_mode
        self.groups: List[Dict] = []
        for g in params:
            group = {**defaults, **g, "params": list(g["params"])}
            H.validate(group)
            group["rho"] = H.resolved_rho(group["rho"], sam_mode)
            if group["ascent_beta"] is None:
                group["ascent_beta"] = group["betas"][0]
            group.update(k=0, lr_max=-1.0, weight_sum=0.0)
            self.groups.append(group)
        self.state: Dict[Tensor, Dict[str, Tensor]] = {}
        self.s: List[float] = [0.0] * len(self.groups)   # the ascent scale applied per group
        self.train_mode = False
        self.skipped_steps = 0
        self._pending_skip = False   # two_pass: the first gradient was non-finite

    # the sequences -----------------------------------------------------------
    def _st(self, p: Tensor) -> Dict[str, Tensor]:
        if p not in self.state:
            x = p.detach().clone()
            self.state[p] = dict(x=x, z=x.clone(), m=torch.zeros_like(x), v=torch.zeros_like(x))
        return self.state[p]

    @staticmethod
    def _y(st, beta1: float) -> Tensor:
        return (1 - beta1) * st["z"] + beta1 * st["x"]

    def _norm_m(self) -> float:
        total = 0.0
        for group in self.groups:
            if group["rho"] > 0:
                total += sum(float((self.state[p]["m"].double() ** 2).sum()) for p in group["params"] if p in self.state)
        return math.sqrt(total)

    def _write_params(self, at_ascent: bool) -> None:
        """p ← x (eval), or y + s·m (train)."""
        with torch.no_grad():
            for gi, group in enumerate(self.groups):
                for p in group["params"]:
                    if p not in self.state:
                        continue
                    st = self.state[p]
                    if not self.train_mode:
                        p.copy_(st["x"])
                    else:
                        s = self.s[gi] if at_ascent and group["rho"] > 0 else 0.0
                        p.copy_(self._y(st, group["betas"][0]) + s * st["m"])

    def _set_scales(self, sign_of_mode: float) -> None:
        norm = self._norm_m()
        self.s = [(sign_of_mode * g["rho"] / norm) if norm > 0 and g["rho"] > 0 else 0.0
                  for g in self.groups]

    # the API ---------------------------------------------------------------
    def train(self) -> None:
        if not self.train_mode:
            self.train_mode = True
            self._write_params(at_ascent=self.sam_mode == "one_pass")

    def eval(self) -> None:
        if self.train_mode:
            self.train_mode = False
            if self.sam_mode == "two_pass":
                self.s = [0.0] * len(self.groups)
            self._write_params(at_ascent=False)

    def zero_grad(self) -> None:
        for group in self.groups:
            for p in group["params"]:
                p.grad = None

    def _grads_finite(self) -> bool:
        return all(torch.isfinite(p.grad).all() for g in self.groups for p in g["params"] if p.grad is not None)

    def move_to_ascent(self) -> None:
        if self.sam_mode == "one_pass":
            return
        self._pending_skip = not self._grads_finite()
        if not self._pending_skip:
            for group in self.groups:
                b = group["ascent_beta"]
                for p in group["params"]:
                    if p.grad is not None and group["rho"] > 0:
                        st = self._st(p)
                        st["m"] = b * st["m"] + (1 - b) * p.grad
            self._set_scales(+1.0)
        else:
            self.s = [0.0] * len(self.groups)
        self.zero_grad()
        self._write_params(at_ascent=True)

    def move_from_ascent(self) -> None:
        self._write_params(at_ascent=False)

    @torch.no_grad()
    def step(self) -> None:
        if not self._grads_finite() or self._pending_skip:
            self._pending_skip = False
            self.skipped_steps += 1
            self._write_params(at_ascent=self.sam_mode == "one_pass")
            return
        for group in self.groups:
            beta1, beta2 = group["betas"]
            k = group["k"]
            t = k + 1
            sched = min(1.0, t / group["warmup_steps"]) if group["warmup_steps"] > 0 else 1.0
            gamma = group["lr"] * sched
            bc2 = 1 - beta2 ** t
            group["lr_max"] = max(group["lr_max"], gamma)
            w = t ** group["r"] * group["lr_max"] ** group["weight_lr_power"]
            group["weight_sum"] += w
            c = w / group["weight_sum"] if group["weight_sum"] != 0 else 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._st(p)
                g = p.grad
                if self.sam_mode == "one_pass" and group["rho"] > 0:
                    b = group["ascent_beta"]
                    st["m"] = b * st["m"] + (1 - b) * g
                st["v"] = beta2 * st["v"] + (1 - beta2) * g * g
                y = self._y(st, beta1)
                u = g / ((st["v"] / bc2).sqrt() + group["eps"]) + group["weight_decay"] * y
                st["z"] = st["z"] - gamma * u
                st["x"] = (1 - c) * st["x"] + c * st["z"]
            group["k"] = t
        if self.sam_mode == "one_pass":
            self._set_scales(-1.0)
        else:
            self.s = [0.0] * len(self.groups)
        self._write_params(at_ascent=self.sam_mode == "one_pass")

    def x(self, p: Tensor) -> Tensor:
        """The averaged iterate x of ``p`` (what eval mode evaluates)."""
        return self.state[p]["x"] if p in self.state else p.detach()
