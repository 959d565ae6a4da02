"""The mode machine: round trips, wrong-order calls, params without grads, empty groups."""
from __future__ import annotations

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree

from .models import batch, decay_groups, flat, mse, one_step, tiny_mlp


def _trained(mode: str, steps: int = 5, **kw):
    x, y = batch()
    model = tiny_mlp()
    opt = AdamWMSAMScheduleFree(decay_groups(model), lr=0.01, sam_mode=mode, **kw)
    opt.train()
    for _ in range(steps):
        one_step(model, opt, x, y, mode)
    return model, opt, x, y


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_eval_train_round_trip(mode):
    model, opt, *_ = _trained(mode)
    before = flat(model)
    opt.eval()
    assert (flat(model) - before).abs().max() > 1e-4  # x differs from y
    opt.train()
    assert torch.allclose(flat(model), before, rtol=0, atol=1e-6)


def test_one_pass_params_sit_at_ascent_and_move_from_ascent_removes_it():
    model, opt, *_ = _trained("one_pass")
    at_ascent = flat(model)
    opt.move_from_ascent()
    y = flat(model)
    dist = (at_ascent - y).norm().item()
    assert dist == pytest.approx(1.0, rel=1e-5)  # ||s·m|| = ρ = 1 (the one_pass default)
    for g in opt.param_groups:
        assert not g["at_ascent"]
    opt.move_from_ascent()  # one_pass: a second removal is a no-op
    assert torch.equal(flat(model), y)


def test_two_pass_move_to_and_from_ascent_round_trip():
    model, opt, x, y = _trained("two_pass")
    before = flat(model)
    mse(model, x, y).backward()
    opt.move_to_ascent()
    assert (flat(model) - before).norm().item() == pytest.approx(0.05, rel=1e-5)  # two_pass default ρ
    opt.move_from_ascent()
    assert torch.allclose(flat(model), before, rtol=0, atol=1e-7)


def test_eval_during_two_pass_ascent_removes_it():
    model, opt, x, y = _trained("two_pass")
    y_before = flat(model)
    opt.eval()
    x_weights = flat(model)
    opt.train()
    mse(model, x, y).backward()
    opt.move_to_ascent()
    opt.eval()
    assert torch.allclose(flat(model), x_weights, rtol=0, atol=1e-6)
    opt.train()
    assert torch.allclose(flat(model), y_before, rtol=0, atol=1e-6)


def test_step_in_eval_mode_raises():
    model = tiny_mlp()
    opt = AdamWMSAMScheduleFree(model.parameters())
    with pytest.raises(RuntimeError, match=r"step\(\) was called in eval mode: call optimizer.train\(\)"):
        opt.step()


def test_require_train_is_the_public_mode_check():
    """What wrappers (the DeepSpeed facade) call for the optimizer's own eval-mode error."""
    model = tiny_mlp()
    opt = AdamWMSAMScheduleFree(model.parameters())
    with pytest.raises(RuntimeError, match=r"move_to_ascent\(\) was called in eval mode: call optimizer.train\(\)"):
        opt.require_train("move_to_ascent()")
    opt.train()
    opt.require_train("move_to_ascent()")  # train mode: no error


def test_move_to_ascent_twice_raises():
    model, opt, x, y = _trained("two_pass", steps=1)
    mse(model, x, y).backward()
    opt.move_to_ascent()
    mse(model, x, y).backward()
    with pytest.raises(RuntimeError, match=r"move_to_ascent\(\) was called twice"):
        opt.move_to_ascent()


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_move_to_ascent_without_gradients_raises(mode):
    model, opt, *_ = _trained(mode, steps=1)
    with pytest.raises(RuntimeError, match=r"move_to_ascent\(\) needs the gradients of a first backward pass"):
        opt.move_to_ascent()


def test_move_to_ascent_in_one_pass_with_grads_is_a_no_op():
    model, opt, x, y = _trained("one_pass", steps=2)
    before = flat(model)
    mse(model, x, y).backward()
    opt.move_to_ascent()
    assert torch.equal(flat(model), before)
    assert all(p.grad is not None for p in model.parameters())


def test_move_from_ascent_without_move_to_ascent_raises_in_two_pass():
    model, opt, *_ = _trained("two_pass", steps=1)
    with pytest.raises(RuntimeError, match=r"move_from_ascent\(\) without move_to_ascent\(\)"):
        opt.move_from_ascent()


def test_move_to_ascent_in_eval_mode_raises():
    model, opt, x, y = _trained("two_pass", steps=1)
    opt.eval()
    mse(model, x, y).backward()
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.move_to_ascent()


def test_param_without_grad_keeps_state_but_is_perturbed():
    """A param with no grad in a step keeps z, v, m and y; its p moves only by the change of s·m."""
    model, opt, x, y = _trained("one_pass", steps=3)
    frozen = list(model.parameters())[0]
    st = {k: v.clone() for k, v in opt.state[frozen].items()}
    s_old = opt.param_groups[0]["ascent_scale"]
    p_old = frozen.detach().clone()
    mse(model, x, y).backward()
    frozen.grad = None
    opt.step()
    for k, v in st.items():
        assert torch.equal(opt.state[frozen][k], v), k
    s_new = opt.param_groups[0]["ascent_scale"]
    assert s_new != s_old
    expected = p_old - s_old * st["exp_avg"] + s_new * st["exp_avg"]
    assert torch.allclose(frozen.detach(), expected, atol=1e-7)


def test_empty_group_and_rho0_group():
    model = tiny_mlp()
    ws = [p for p in model.parameters() if p.ndim == 2]
    bs = [p for p in model.parameters() if p.ndim == 1]
    opt = AdamWMSAMScheduleFree([{"params": ws}, {"params": [], "lr": 0.1}, {"params": bs, "rho": 0.0}], lr=0.01)
    x, y = batch()
    opt.train()
    for _ in range(3):
        mse(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    assert all("exp_avg" in opt.state[p] for p in ws)
    assert all("exp_avg" not in opt.state[p] for p in bs)  # rho = 0 keeps no momentum
    # the global norm spans the rho > 0 groups only: the applied ascent has length rho = 1
    at_ascent = [p.detach().clone() for p in ws + bs]
    opt.move_from_ascent()
    moved = torch.cat([(a - p.detach()).reshape(-1) for a, p in zip(at_ascent, ws + bs)])
    assert moved.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert all(torch.equal(a, p) for a, p in zip(at_ascent[len(ws):], bs))  # rho = 0: never perturbed
    assert opt.param_groups[1]["k"] == 3


def test_closure_is_evaluated():
    model = tiny_mlp()
    x, y = batch()
    opt = AdamWMSAMScheduleFree(model.parameters())
    opt.train()

    def closure():
        loss = mse(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and loss.item() > 0
    assert opt.param_groups[0]["k"] == 1


def test_state_init_call_does_not_count_as_a_step():
    """torch.distributed.checkpoint's _init_optim_state: step() with zero grads and lr = 0."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model = tiny_mlp()
    before = flat(model)
    opt = AdamWMSAMScheduleFree(model.parameters(), lr=0.01)
    opt.train()
    _init_optim_state(opt)
    assert opt.state and all(g["k"] == 0 for g in opt.param_groups)
    assert all(g["weight_sum"] == 0.0 and g["lr"] == 0.01 for g in opt.param_groups)
    assert torch.equal(flat(model), before)
    assert all(p.grad is None for p in model.parameters())


def test_state_is_fp32_for_bf16_params():
    model = tiny_mlp(dtype=torch.bfloat16)
    x, y = batch(dtype=torch.bfloat16)
    opt = AdamWMSAMScheduleFree(model.parameters(), lr=0.01)
    opt.train()
    losses = []
    for _ in range(20):
        loss = mse(model, x, y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert {opt.state[p][k].dtype for k in ("z", "exp_avg_sq", "exp_avg")} == {torch.float32}
    assert losses[-1] < losses[0]
    # and a state_dict round trip keeps the state in fp32
    sd = opt.state_dict()
    opt2 = AdamWMSAMScheduleFree(model.parameters(), lr=0.01)
    opt2.load_state_dict(sd)
    assert all(opt2.state[p]["z"].dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_bf16_params_follow_fp32_within_bf16_precision(mode):
    x, y = batch()
    runs = []
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_mlp(dtype=dtype)
        opt = AdamWMSAMScheduleFree(model.parameters(), lr=0.01, sam_mode=mode)
        opt.train()
        for _ in range(10):
            mse(model, x.to(dtype), y.to(dtype)).backward()
            if mode == "two_pass":
                opt.move_to_ascent()
                mse(model, x.to(dtype), y.to(dtype)).backward()
                opt.move_from_ascent()
            opt.step()
            opt.zero_grad()
        opt.eval()
        runs.append(flat(model).float())
    assert (runs[0] - runs[1]).abs().max().item() < 0.05


def test_two_pass_step_without_move_to_ascent_raises():
    """A second backward was never taken: the step says what to call, and changes nothing."""
    model, opt, x, y = _trained("two_pass", steps=2)
    before = flat(model)
    mse(model, x, y).backward()
    with pytest.raises(RuntimeError, match=r"step\(\) in two_pass mode without move_to_ascent\(\).*"
                                           r"call optimizer.move_to_ascent\(\)"):
        opt.step()
    assert torch.equal(flat(model), before) and opt.param_groups[0]["k"] == 2
    opt.move_to_ascent()  # the documented order then works
    mse(model, x, y).backward()
    opt.move_from_ascent()
    opt.step()
    assert opt.param_groups[0]["k"] == 3


def test_two_pass_rho0_steps_without_ascent():
    """With rho = 0 everywhere there is no ascent to take: plain Schedule-Free steps are fine."""
    model, opt, x, y = _trained("two_pass", steps=2, rho=0.0)
    mse(model, x, y).backward()
    opt.step()
    assert opt.param_groups[0]["k"] == 3


def test_move_to_ascent_again_after_move_from_ascent_raises():
    model, opt, x, y = _trained("two_pass", steps=1)
    mse(model, x, y).backward()
    opt.move_to_ascent()
    mse(model, x, y).backward()
    opt.move_from_ascent()
    with pytest.raises(RuntimeError, match=r"move_to_ascent\(\) was called twice"):
        opt.move_to_ascent()


def test_eval_between_move_to_ascent_and_step_abandons_the_ascent():
    """Defined behaviour: eval() removes the ascent and moves to x; after train() the params
    are at y again, the second-pass gradient is not used, and step() needs a new
    move_to_ascent() (m keeps the first gradient it folded in)."""
    model, opt, x, y = _trained("two_pass")
    y_before = flat(model)
    m_before = opt.state[list(model.parameters())[0]]["exp_avg"].clone()
    mse(model, x, y).backward()
    opt.move_to_ascent()
    mse(model, x, y).backward()
    opt.eval()
    assert not opt.param_groups[0]["at_ascent"] and not opt.param_groups[0]["ascent_taken"]
    opt.train()
    assert torch.allclose(flat(model), y_before, rtol=0, atol=1e-6)
    assert not torch.equal(opt.state[list(model.parameters())[0]]["exp_avg"], m_before)  # g0 was folded
    with pytest.raises(RuntimeError, match=r"without move_to_ascent\(\)"):
        opt.step()
    opt.zero_grad()
    one_step(model, opt, x, y, "two_pass")
    assert opt.param_groups[0]["k"] == 6
