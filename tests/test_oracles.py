"""The optimizer against independent oracles: schedulefree (rho=0), the in-package
reference (both modes), SAM on Schedule-Free (two_pass, ascent_beta=0), and a
hand-computed MSAM step (the sign of the perturbation)."""
from __future__ import annotations

import pytest
import schedulefree
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree, AdamWMSAMScheduleFreeReference

from .models import batch, decay_groups, flat, mse, tiny_mlp, train_loop

HP = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, warmup_steps=10, r=0.5, weight_lr_power=2.0)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_rho0_equals_schedulefree(foreach, mode):
    """rho = 0 is plain Schedule-Free AdamW: train- and eval-mode weights, every step."""
    x, y = batch()
    ref_model, model = tiny_mlp(), tiny_mlp()
    ref = schedulefree.AdamWScheduleFree(decay_groups(ref_model), foreach=foreach, **HP)
    opt = AdamWMSAMScheduleFree(decay_groups(model), rho=0.0, sam_mode=mode, foreach=foreach, **HP)
    ref.train(), opt.train()
    worst_train = 0.0
    for step in range(60):
        mse(ref_model, x, y).backward()
        ref.step(), ref.zero_grad()
        mse(model, x, y).backward()
        if mode == "two_pass":
            opt.move_to_ascent()
            mse(model, x, y).backward()
            opt.move_from_ascent()
        opt.step(), opt.zero_grad()
        worst_train = max(worst_train, (flat(ref_model) - flat(model)).abs().max().item())
        if step == 30:  # an eval → train switch mid-run
            ref.eval(), opt.eval()
            assert torch.allclose(flat(ref_model), flat(model), rtol=0, atol=1e-6)
            ref.train(), opt.train()
    assert worst_train <= 1e-6
    ref.eval(), opt.eval()
    assert (flat(ref_model) - flat(model)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_equals_reference(foreach, mode):
    """Both modes follow the x/y/z reference (float64), with two groups, a param
    without gradients for some steps, and an eval → train switch mid-run."""
    x, y = batch(dtype=torch.float64)
    model, ref_model = tiny_mlp(dtype=torch.float64), tiny_mlp(dtype=torch.float64)
    opt = AdamWMSAMScheduleFree(decay_groups(model), sam_mode=mode, foreach=foreach, **HP)
    ref = AdamWMSAMScheduleFreeReference(decay_groups(ref_model), sam_mode=mode, **HP)
    frozen_idx = 1  # the first bias gets no gradient on every third step

    def run(m, o):
        o.train()
        for i in range(40):
            mse(m, x, y).backward()
            if mode == "two_pass":
                o.move_to_ascent()
                mse(m, x, y).backward()
                o.move_from_ascent()
            if i % 3 == 2:
                list(m.parameters())[frozen_idx].grad = None
            o.step()
            o.zero_grad()
            if i == 20:
                o.eval()
                o.train()
        o.eval()
        return flat(m)

    a, b = run(model, opt), run(ref_model, ref)
    assert (a - b).abs().max().item() <= 1e-10, (a - b).abs().max().item()
    assert (a - flat(tiny_mlp(dtype=torch.float64))).abs().max() > 1e-3  # it did move


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_foreach_equals_single_tensor_float64(mode):
    x, y = batch(dtype=torch.float64)
    runs = []
    for fe in (True, False):
        model = tiny_mlp(dtype=torch.float64)
        opt = AdamWMSAMScheduleFree(decay_groups(model), sam_mode=mode, foreach=fe, **HP)
        runs.append(train_loop(model, opt, x, y, 30, mode, switch_at=10))
    assert (runs[0] - runs[1]).abs().max().item() <= 1e-12


def test_two_pass_ascent_beta0_is_sam_on_schedulefree():
    """two_pass, ascent_beta = 0: g = ∇f(y + ρ·g0/||g0||) fed to Schedule-Free AdamW."""
    rho = 0.05
    x, y = batch(dtype=torch.float64)
    model, sam_model = tiny_mlp(dtype=torch.float64), tiny_mlp(dtype=torch.float64)
    opt = AdamWMSAMScheduleFree(model.parameters(), rho=rho, ascent_beta=0.0, sam_mode="two_pass", **HP)
    sf = schedulefree.AdamWScheduleFree(sam_model.parameters(), foreach=False, **HP)
    opt.train(), sf.train()
    params = list(sam_model.parameters())
    for _ in range(25):
        mse(model, x, y).backward()
        opt.move_to_ascent()
        mse(model, x, y).backward()
        opt.move_from_ascent()
        opt.step(), opt.zero_grad()
        # SAM by hand, the ascent along the normalised current gradient
        g0 = torch.autograd.grad(mse(sam_model, x, y), params)
        norm = torch.sqrt(sum((g ** 2).sum() for g in g0))
        e = [rho * g / norm for g in g0]
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        g = torch.autograd.grad(mse(sam_model, x, y), params)
        with torch.no_grad():
            for p, ei, gi in zip(params, e, g):
                p.sub_(ei)
                p.grad = gi.clone()
        sf.step(), sf.zero_grad()
    opt.eval(), sf.eval()
    assert (flat(model) - flat(sam_model)).abs().max().item() <= 1e-10


def test_one_pass_perturbation_sign_is_msam_by_hand():
    """Two steps on f(w) = ½·wᵀAw, computed by hand: after step 1 the params sit at
    ỹ1 = y1 − ρ·m1/||m1|| with m1 = (1 − β)·g1 (MSAM's w − ρ·v/||v||, the direction of
    the last descent step), and step 2 takes its gradient there."""
    A = torch.tensor([[3.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    w0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    lr, beta1, beta2, eps, rho = 0.1, 0.9, 0.999, 1e-8, 0.3
    w = torch.nn.Parameter(w0.clone())
    opt = AdamWMSAMScheduleFree([w], lr=lr, betas=(beta1, beta2), eps=eps, rho=rho, weight_lr_power=0.0)
    opt.train()
    grads_seen = []
    for _ in range(2):
        w.grad = A @ w.detach()
        grads_seen.append(w.grad.clone())
        opt.step()
    # by hand: step 1 at y0 = z0 = x0 = w0 (m0 = 0: no perturbation)
    g1 = A @ w0
    assert torch.allclose(grads_seen[0], g1)
    v1 = (1 - beta2) * g1 ** 2
    u1 = g1 / (torch.sqrt(v1 / (1 - beta2)) + eps)          # = sign(g1) up to eps
    z1 = w0 - lr * u1
    c1 = 1.0                                                 # w1/W1 with weight_lr_power 0
    x1 = (1 - c1) * w0 + c1 * z1
    y1 = (1 - beta1) * z1 + beta1 * x1
    m1 = (1 - beta1) * g1
    y1_tilde = y1 - rho * m1 / m1.norm()
    assert torch.allclose(grads_seen[1], A @ y1_tilde, atol=1e-12)
    # the look-ahead goes along −m: the direction the descent has been moving
    step_dir = y1 - w0
    assert torch.dot(y1_tilde - y1, step_dir) > 0
    assert torch.dot(y1_tilde - y1, g1) < 0
    # after step 2 the scale applied is s = −ρ/||m2||, m2 = β·m1 + (1 − β)·g2
    m2 = beta1 * m1 + (1 - beta1) * grads_seen[1]
    assert opt.param_groups[0]["ascent_scale"] == pytest.approx(-rho / m2.norm().item(), rel=1e-12)


def test_two_pass_ascent_sign_is_sam():
    """two_pass: the ascent climbs the (momentum-smoothed) current gradient: ỹ − y = +ρ·m/||m||."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = AdamWMSAMScheduleFree([w], rho=0.2, sam_mode="two_pass")
    opt.train()
    y = w.detach().clone()
    w.grad = torch.tensor([0.3, 0.4], dtype=torch.float64)
    opt.move_to_ascent()
    assert w.grad is None  # the first gradient is folded into m and cleared
    assert torch.allclose(w.detach() - y, 0.2 * torch.tensor([0.6, 0.8], dtype=torch.float64))
