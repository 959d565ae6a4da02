"""``step(closure)``: two_pass runs the SAM loop (zero_grad, closure at y, move_to_ascent(), closure at
the ascent point, move_from_ascent(), update) and returns the first loss; one_pass calls the closure
once. Both equal the x/y/z reference (float64) driven by the explicit loop on the same batches."""
from __future__ import annotations

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree
from sharded_msam_sf.reference import AdamWMSAMScheduleFreeReference
from tests.models import batch, decay_groups, flat, mse, tiny_mlp

HP = dict(lr=0.01, warmup_steps=2, weight_decay=0.0)
STEPS = 12


def _batches():
    return [batch(seed=s, dtype=torch.float64) for s in range(3)]


def _closure_run(mode, rho=None):
    model = tiny_mlp(dtype=torch.float64)
    opt = AdamWMSAMScheduleFree(decay_groups(model), sam_mode=mode, rho=rho, **HP)
    calls, losses = [], []
    opt.train()
    for i in range(STEPS):
        x, y = _batches()[i % 3]

        def closure():
            calls.append(i)
            opt.zero_grad()   # the usual closure convention
            loss = mse(model, x, y)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
    opt.eval()
    return flat(model), calls, losses, opt


def _reference_run(mode, rho=None):
    model = tiny_mlp(dtype=torch.float64)
    ref = AdamWMSAMScheduleFreeReference(decay_groups(model), sam_mode=mode, rho=rho, **HP)
    first = []
    ref.train()
    for i in range(STEPS):
        x, y = _batches()[i % 3]
        loss = mse(model, x, y)
        first.append(float(loss.detach()))
        loss.backward()
        if mode == "two_pass":
            ref.move_to_ascent()
            mse(model, x, y).backward()
            ref.move_from_ascent()
        ref.step()
        ref.zero_grad()
    ref.eval()
    return flat(model), first


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_step_closure_equals_the_reference_loop(mode):
    ours, calls, losses, _ = _closure_run(mode)
    ref, ref_losses = _reference_run(mode)
    assert (ours - ref).abs().max().item() <= 1e-10
    per_step = 2 if mode == "two_pass" else 1
    assert calls == [i for i in range(STEPS) for _ in range(per_step)]
    # the loss returned is the first one (at y in two_pass, at the ascent point in one_pass)
    assert losses == pytest.approx(ref_losses, rel=1e-12, abs=1e-12)


def test_two_pass_closure_is_not_plain_schedule_free():
    sam, _, _, _ = _closure_run("two_pass", rho=0.05)
    plain, calls, _, _ = _closure_run("two_pass", rho=0.0)
    assert (sam - plain).abs().max().item() > 1e-4
    assert calls == list(range(STEPS))  # rho = 0: no ascent, one gradient per step


def test_two_pass_closure_zeroes_stale_gradients_first():
    # gradients left from the previous step (Lightning zeroes them inside its closure, others don't)
    a, _, _, _ = _closure_run("two_pass")
    model = tiny_mlp(dtype=torch.float64)
    opt = AdamWMSAMScheduleFree(decay_groups(model), sam_mode="two_pass", **HP)
    opt.train()
    for i in range(STEPS):
        x, y = _batches()[i % 3]
        for p in model.parameters():
            p.grad = torch.full_like(p, 3.0)   # stale garbage
        opt.step(lambda: mse(model, x, y).backward())
    opt.eval()
    assert (flat(model) - a).abs().max().item() <= 1e-12


def test_closure_after_move_to_ascent_is_called_once():
    # the caller's own loop (Lightning's manual optimization passes a closure that does nothing)
    a, b = tiny_mlp(), tiny_mlp()
    oa = AdamWMSAMScheduleFree(a.parameters(), sam_mode="two_pass")
    ob = AdamWMSAMScheduleFree(b.parameters(), sam_mode="two_pass")
    x, y = batch()
    calls = []
    for m, o, closure in ((a, oa, lambda: calls.append(1)), (b, ob, None)):
        o.train()
        mse(m, x, y).backward()
        o.move_to_ascent()
        mse(m, x, y).backward()
        o.move_from_ascent()
        o.step(closure)
    assert calls == [1] and torch.equal(flat(a), flat(b))


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_closure_without_gradients_makes_no_step(mode):
    model = tiny_mlp()
    opt = AdamWMSAMScheduleFree(model.parameters(), sam_mode=mode)
    opt.train()
    before = flat(model).clone()
    assert opt.step(lambda: None) is None
    assert opt.param_groups[0]["k"] == 0 and torch.equal(flat(model), before)


def test_two_pass_step_without_ascent_still_raises():
    model = tiny_mlp()
    opt = AdamWMSAMScheduleFree(model.parameters(), sam_mode="two_pass")
    opt.train()
    x, y = batch()
    mse(model, x, y).backward()
    with pytest.raises(RuntimeError, match="without move_to_ascent"):
        opt.step()


def test_step_without_any_gradient_is_refused():
    model = tiny_mlp()
    opt = AdamWMSAMScheduleFree(model.parameters())
    opt.train()
    with pytest.raises(RuntimeError, match="no gradient on any parameter"):
        opt.step()
