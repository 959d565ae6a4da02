"""state_dict: save → load → continue equals the uninterrupted run, bit for bit."""
from __future__ import annotations

import io

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree

from .models import batch, decay_groups, flat, one_step, tiny_mlp

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
