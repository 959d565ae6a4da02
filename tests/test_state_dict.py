"""state_dict: save → load → continue equals the uninterrupted run, bit for bit."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree

from .models import batch, decay_groups, flat, mse, one_step, tiny_mlp

HP = dict(lr=0.01, warmup_steps=3, r=0.5)


def _steps(model, opt, data, mode, n):
    for i in range(n):
        one_step(model, opt, *data[i % len(data)], mode)


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
@pytest.mark.parametrize("save_in_eval", [False, True])
def test_resume_is_bit_identical(mode, save_in_eval):
    data = [batch(seed=s) for s in range(4)]
    model = tiny_mlp()
    opt = AdamWMSAMScheduleFree(decay_groups(model), sam_mode=mode, **HP)
    opt.train()
    _steps(model, opt, data, mode, 7)
    if save_in_eval:
        opt.eval()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    # the uninterrupted run
    if save_in_eval:
        opt.train()
    _steps(model, opt, data, mode, 6)
    opt.eval()
    uninterrupted = flat(model)
    # resume into fresh objects, from bytes, with weights_only loading
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = tiny_mlp(seed=123)
    opt2 = AdamWMSAMScheduleFree(decay_groups(model2), sam_mode=mode, **HP)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    if mode == "one_pass" and not save_in_eval:
        assert opt2.param_groups[0]["at_ascent"] and opt2.param_groups[0]["ascent_scale"] != 0.0
    assert opt2.param_groups[0]["train_mode"] == (not save_in_eval)
    opt2.train()
    _steps(model2, opt2, data, mode, 6)
    opt2.eval()
    assert torch.equal(flat(model2), uninterrupted)


def test_state_dict_carries_mode_scale_and_counters():
    model = tiny_mlp()
    opt = AdamWMSAMScheduleFree(model.parameters(), lr=0.01)
    opt.train()
    _steps(model, opt, [batch()], "one_pass", 2)
    sd = opt.state_dict()
    g = sd["param_groups"][0]
    assert g["k"] == 2 and g["train_mode"] and g["at_ascent"] and g["ascent_scale"] < 0
    assert set(sd["state"][0]) == {"z", "exp_avg_sq", "exp_avg"}


# ---------------------------------------------------------------- loading a state dict that does not fit
def _saved(mode="one_pass", **kw):
    model = tiny_mlp()
    opt = AdamWMSAMScheduleFree(model.parameters(), lr=0.01, sam_mode=mode, **kw)
    opt.train()
    _steps(model, opt, [batch()], mode, 2)
    return copy.deepcopy(opt.state_dict())


def _fresh(mode="one_pass", **kw):
    model = tiny_mlp()
    return model, AdamWMSAMScheduleFree(model.parameters(), lr=0.01, sam_mode=mode, **kw)


def _foreign(opt_cls, **kw):
    model = tiny_mlp()
    opt = opt_cls(model.parameters(), lr=0.01, **kw)
    if hasattr(opt, "train"):
        opt.train()
    mse(model, *batch()).backward()
    opt.step()
    return opt.state_dict()


def _mutate(sd, fn):
    fn(sd)
    return sd


@pytest.mark.parametrize("make_sd, message", [
    (lambda: _foreign(torch.optim.AdamW), r"param_groups\[0\] lacks \[.*'rho'.*\]: not a state dict of "
                                          r"AdamWMSAMScheduleFree \(it looks like torch.optim.AdamW's\)"),
    (lambda: _foreign(__import__("schedulefree").AdamWScheduleFree), r"lacks .* \(it looks like schedulefree's\)"),
    (lambda: _saved("two_pass"), r"has sam_mode='two_pass' but this optimizer runs sam_mode='one_pass'"),
    (lambda: _saved(rho=0.5), r"has rho=0.5 but this optimizer has rho=1.0; build it with rho=0.5"),
    (lambda: _saved(state_dtype=torch.bfloat16), r"has state_dtype=torch.bfloat16 but this optimizer has "
                                                 r"state_dtype=None"),
    (lambda: _mutate(_saved(), lambda sd: sd["state"][0].pop("z")), r"the state of param 0 .* lacks \['z'\]"),
    (lambda: _mutate(_saved(), lambda sd: sd["state"][2].pop("exp_avg")), r"the state of param 2 .* lacks "
                                                                           r"\['exp_avg'\]"),
    (lambda: _mutate(_saved(), lambda sd: sd["state"][1]["exp_avg_sq"].fill_(float("nan"))),
     r"state 'exp_avg_sq' of param 1 .* holds NaN/inf"),
    (lambda: _mutate(_saved(), lambda sd: sd["state"][0].update(z=torch.zeros(3, 3))),
     r"state 'z' of param 0 .* has shape \(3, 3\) but the param has shape \(7, 5\)"),
    (lambda: _mutate(_saved(), lambda sd: sd["param_groups"][0].update(lr=-1.0)),
     r"param_groups\[0\]: Invalid learning rate \(lr\): -1.0"),
    (lambda: _mutate(_saved(), lambda sd: sd["param_groups"][0].update(betas=(0.9, True))),
     r"Invalid beta parameter at index 1: True"),
    (lambda: _mutate(_saved(), lambda sd: sd["param_groups"][0].update(weight_sum=float("nan"))),
     r"param_groups\[0\]\['weight_sum'\] is nan"),
    (lambda: _mutate(_saved(), lambda sd: sd["param_groups"][0].pop("k")), r"param_groups\[0\] lacks \['k'\]"),
    (lambda: _mutate(_saved(), lambda sd: sd.pop("state")), r"missing the key 'state'"),
])
def test_load_state_dict_refuses_what_does_not_fit(make_sd, message):
    """A clear error naming what differs; the optimizer is left as it was (no silent mode switch)."""
    sd = make_sd()
    _, opt = _fresh()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    assert opt.state_dict() == before


def test_load_state_dict_of_another_shape_of_model():
    sd = _saved()
    model = tiny_mlp(sizes=(5, 8, 3))
    opt = AdamWMSAMScheduleFree(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match=r"has shape \(7, 5\) but the param has shape \(8, 5\)"):
        opt.load_state_dict(sd)


def test_load_state_dict_fills_counters_added_later():
    """A checkpoint of this optimizer from before v_overflow_steps/ascent_taken existed still loads."""
    sd = _saved()
    for g in sd["param_groups"]:
        g.pop("v_overflow_steps"), g.pop("ascent_taken")
    _, opt = _fresh()
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["v_overflow_steps"] == 0 and opt.param_groups[0]["ascent_taken"] is False
