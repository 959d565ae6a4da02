"""``AdamWMSAMScheduleFree.skip_step``: an engine's skip decision (DeepSpeed's overflow check) leaves
the optimizer exactly where a NaN gradient handed to ``step()`` / ``move_to_ascent()`` would."""
import copy
import warnings

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree


def _setup(sam_mode):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
              {"params": [model[0].bias, model[2].bias], "lr": 0.01}]
    opt = AdamWMSAMScheduleFree(groups, lr=0.02, rho=0.05, sam_mode=sam_mode, warmup_steps=1)
    opt.train()
    return model, opt


def _backward(model, k, nan=False):
    g = torch.Generator().manual_seed(k)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x), y)
    (loss * float("nan") if nan else loss).backward()


def _train_step(model, opt, k, *, skip=None):
    """One step of the seed's loop. ``skip``: None, "nan_step"/"skip_step" (the step's gradient is
    dropped), or "nan_ascent"/"skip_ascent" (two_pass: the first pass's gradient is dropped)."""
    _backward(model, k, nan=skip == "nan_ascent" or (skip == "nan_step" and opt.sam_mode == "one_pass"))
    if opt.sam_mode == "two_pass":
        if skip == "skip_ascent":
            opt.skip_step("test", ascent=True)
        else:
            opt.move_to_ascent()
        _backward(model, 100 + k, nan=skip == "nan_step")
        opt.move_from_ascent()
    if skip == "skip_step":
        opt.skip_step("test")
    else:
        opt.step()


def _everything(model, opt):
    state = {(i, key): t.clone() for i, p in enumerate(model.parameters()) for key, t in opt.state[p].items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return [p.detach().clone() for p in model.parameters()], state, copy.deepcopy(groups)


def _assert_same(a, b):
    pa, sa, ga = a
    pb, sb, gb = b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb)), "params differ"
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), "state differs"
    assert ga == gb, (ga, gb)


@pytest.mark.parametrize("sam_mode, where", [("one_pass", "step"), ("two_pass", "step"), ("two_pass", "ascent")])
def test_skip_step_equals_a_nan_gradient_seen_by_the_optimizer(sam_mode, where):
    runs = {}
    for route in ("nan", "skip"):
        model, opt = _setup(sam_mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for k in range(5):
                _train_step(model, opt, k, skip=f"{route}_{where}" if k == 2 else None)
        assert opt.skipped_steps == 1
        assert [g["k"] for g in opt.param_groups] == [4, 4]
        opt.eval()
        runs[route] = _everything(model, opt)
    _assert_same(runs["nan"], runs["skip"])


def test_skip_step_two_pass_removes_an_ascent_left_in_place():
    model, opt = _setup("two_pass")
    _train_step(model, opt, 0)
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model, 1)
    opt.move_to_ascent()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "no ascent was applied"
    with pytest.warns(RuntimeWarning, match=r"step skipped \(engine overflow\)"):
        opt.skip_step("engine overflow")
    # y + s·m − s·m: y up to one rounding of the addition
    assert all(torch.allclose(a, p, rtol=0, atol=1e-7) for a, p in zip(before, model.parameters())), \
        "the ascent was not removed"
    assert not any(g["at_ascent"] for g in opt.param_groups) and opt.skipped_steps == 1


def test_skip_step_errors():
    model, opt = _setup("one_pass")
    with pytest.raises(ValueError, match=r"skip_step\(ascent=True\) replaces a two_pass move_to_ascent"):
        opt.skip_step("x", ascent=True)
    opt.eval()
    with pytest.raises(RuntimeError, match=r"skip_step\(\) was called in eval mode"):
        opt.skip_step("x")
