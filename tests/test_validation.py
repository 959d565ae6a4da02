"""Bad hyperparameters fail at construction with a message naming the argument and the valid range."""
from __future__ import annotations

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree


def _params():
    return [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), r"Invalid learning rate \(lr\): -1.0 \(valid: a finite number >= 0\)"),
    (dict(lr=float("nan")), r"Invalid learning rate \(lr\): nan"),
    (dict(betas=(1.0, 0.999)), r"Invalid beta parameter at index 0: 1.0 \(valid: 0 < beta1 < 1"),
    (dict(betas=(0.0, 0.999)), r"Invalid beta parameter at index 0: 0.0 .*dividing by beta1"),
    (dict(betas=(-0.1, 0.999)), r"Invalid beta parameter at index 0: -0.1"),
    (dict(betas=(0.9, 1.0)), r"Invalid beta parameter at index 1: 1.0 \(valid: 0 <= beta2 < 1\)"),
    (dict(betas=(0.9,)), r"Invalid betas: \(0.9,\) \(valid: a pair"),
    (dict(eps=-1e-8), r"Invalid epsilon value \(eps\): -1e-08 \(valid: a finite number >= 0\)"),
    (dict(weight_decay=-0.1), r"Invalid weight_decay: -0.1"),
    (dict(warmup_steps=-1), r"Invalid warmup_steps: -1 \(valid: an integer >= 0\)"),
    (dict(warmup_steps=2.5), r"Invalid warmup_steps: 2.5"),
    (dict(r=-1.0), r"Invalid r: -1.0"),
    (dict(weight_lr_power=-2.0), r"Invalid weight_lr_power: -2.0"),
    (dict(rho=-0.5), r"Invalid rho: -0.5 \(valid: None or a finite number >= 0"),
    (dict(rho=float("inf")), r"Invalid rho: inf"),
    (dict(ascent_beta=1.0), r"Invalid ascent_beta: 1.0 \(valid: None \(= beta1\) or 0 <= ascent_beta < 1\)"),
    (dict(sam_mode="three_pass"), r"Invalid sam_mode: 'three_pass' \(valid: 'one_pass' or 'two_pass'\)"),
    (dict(foreach="yes"), r"Invalid foreach: 'yes'"),
])
def test_bad_hyperparameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdamWMSAMScheduleFree(_params(), **kwargs)


def test_bad_value_in_a_param_group():
    with pytest.raises(ValueError, match=r"Invalid rho: -1"):
        AdamWMSAMScheduleFree([{"params": _params()}, {"params": _params(), "rho": -1}])


def test_mixed_sam_modes_rejected():
    with pytest.raises(ValueError, match="all param groups must use the same sam_mode"):
        AdamWMSAMScheduleFree([{"params": _params()}, {"params": _params(), "sam_mode": "two_pass"}])


def test_single_tensor_rejected():
    with pytest.raises(TypeError, match="iterable of Tensors"):
        AdamWMSAMScheduleFree(torch.nn.Parameter(torch.zeros(3)))


@pytest.mark.parametrize("mode, rho", [("one_pass", 1.0), ("two_pass", 0.05)])
def test_rho_default_depends_on_mode(mode, rho):
    opt = AdamWMSAMScheduleFree(_params(), sam_mode=mode)
    assert opt.param_groups[0]["rho"] == rho


def test_defaults_match_schedulefree():
    opt = AdamWMSAMScheduleFree(_params())
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["warmup_steps"], g["r"], g["weight_lr_power"]) == (
        0.0025, (0.9, 0.999), 1e-8, 0.0, 0, 0.0, 2.0)
    assert g["ascent_beta"] is None and g["sam_mode"] == "one_pass"
