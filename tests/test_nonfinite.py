"""NaN/inf gradients: the step is skipped, the state untouched, the params where they were, a warning and a counter."""
from __future__ import annotations

import copy

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree

from .models import batch, flat, mse, one_step, tiny_mlp


def _setup(mode):
    x, y = batch()
    model = tiny_mlp()
    opt = AdamWMSAMScheduleFree(model.parameters(), lr=0.01, sam_mode=mode)
    opt.train()
    for _ in range(3):
        one_step(model, opt, x, y, mode)
    return model, opt, x, y


def _snapshot(model, opt):
    return flat(model), copy.deepcopy(opt.state_dict())


def _assert_unchanged(model, opt, snap):
    params, sd = snap
    assert torch.equal(flat(model), params)
    now = opt.state_dict()
    for pid, st in sd["state"].items():
        for k, v in st.items():
            assert torch.equal(now["state"][pid][k], v), k
    for g_then, g_now in zip(sd["param_groups"], now["param_groups"]):
        for key in ("k", "weight_sum", "lr_max", "ascent_scale", "at_ascent", "train_mode"):
            assert g_then[key] == g_now[key], key


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_pass_skips_nonfinite_step(bad):
    model, opt, x, y = _setup("one_pass")
    snap = _snapshot(model, opt)
    mse(model, x, y).backward()
    list(model.parameters())[2].grad[0, 1] = bad
    with pytest.warns(RuntimeWarning, match="non-finite gradient .* the step is skipped"):
        opt.step()
    _assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == 1
    opt.zero_grad()
    mse(model, x, y).backward()
    opt.step()  # the next finite step goes through
    assert opt.param_groups[0]["k"] == 4 and opt.skipped_steps == 1


def test_two_pass_nonfinite_second_gradient_skips_step():
    model, opt, x, y = _setup("two_pass")
    snap = _snapshot(model, opt)
    mse(model, x, y).backward()
    opt.move_to_ascent()
    mse(model, x, y).backward()
    list(model.parameters())[0].grad.fill_(float("nan"))
    opt.move_from_ascent()
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    params, sd = snap
    assert torch.allclose(flat(model), params, atol=1e-7)  # back at y
    assert opt.param_groups[0]["k"] == 3 and opt.skipped_steps == 1
    # m took the finite first gradient in move_to_ascent (that is the ascent's momentum)


def test_two_pass_nonfinite_first_gradient_skips_ascent_and_step():
    model, opt, x, y = _setup("two_pass")
    snap = _snapshot(model, opt)
    mse(model, x, y).backward()
    list(model.parameters())[1].grad[0] = float("inf")
    with pytest.warns(RuntimeWarning, match=r"in move_to_ascent\(\)"):
        opt.move_to_ascent()
    assert torch.equal(flat(model), snap[0])  # no perturbation
    mse(model, x, y).backward()
    opt.move_from_ascent()
    with pytest.warns(RuntimeWarning):
        opt.step()
    _assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == 1


def test_large_finite_gradients_are_not_flagged():
    """1e30 is finite: the step runs (no skip). Its square overflows fp32, so v becomes inf
    for those elements: a warning, counted in v_overflow_steps."""
    model, opt, x, y = _setup("one_pass")
    mse(model, x, y).backward()
    for p in model.parameters():
        p.grad.fill_(1e30)  # its square overflows fp32; the skip flag must not fire
    with pytest.warns(RuntimeWarning, match=r"a finite gradient's square overflowed .* v = inf .* so far: 1\)"):
        opt.step()
    assert opt.skipped_steps == 0 and opt.param_groups[0]["k"] == 4
    assert opt.v_overflow_steps == 1
    assert any(torch.isinf(st["exp_avg_sq"]).any() for st in opt.state.values())


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_v_overflow_is_counted_and_saved(mode):
    model, opt, x, y = _setup(mode)
    for _ in range(2):
        mse(model, x, y).backward()
        if mode == "two_pass":
            opt.move_to_ascent()
            mse(model, x, y).backward()
            opt.move_from_ascent()
        list(model.parameters())[0].grad[0, 0] = 3e19   # (3e19)² > 3.4e38
        with pytest.warns(RuntimeWarning, match="overflowed"):
            opt.step()
        opt.zero_grad()
    assert opt.v_overflow_steps == 2 and opt.skipped_steps == 0
    assert opt.state_dict()["param_groups"][0]["v_overflow_steps"] == 2
    one_step(model, opt, x, y, mode)   # a normal step: no warning, the count stays
    assert opt.v_overflow_steps == 2
