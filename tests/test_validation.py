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


# ---------------------------------------------------------------- one validator everywhere
BAD_EVERYWHERE = [
    ("lr", True), ("lr", float("inf")), ("eps", float("inf")), ("eps", float("nan")), ("rho", True),
    ("betas", (0.9, False)), ("betas", (True, 0.999)), ("weight_decay", True), ("warmup_steps", True),
    ("r", False), ("weight_lr_power", True), ("ascent_beta", True), ("foreach", 1), ("fused", "yes"),
    ("state_dtype", torch.float16), ("sam_mode", 2),
]


@pytest.mark.parametrize("key, value", BAD_EVERYWHERE)
def test_bad_values_are_refused_by_optimizer_config_and_reference(key, value):
    """The optimizer, the JSON config and the reference share hyperparams.validate: bools are
    not numbers (lr=True is not 1), eps must be finite."""
    from sharded_msam_sf import AdamWMSAMScheduleFreeReference
    from sharded_msam_sf.config import ConfigError, optimizer_kwargs_from_config
    with pytest.raises(ValueError, match="Invalid"):
        AdamWMSAMScheduleFree(_params(), **{key: value})
    with pytest.raises(ValueError, match="Invalid"):
        AdamWMSAMScheduleFree([{"params": _params(), key: value}])
    if key not in ("foreach", "fused", "state_dtype"):  # (the reference has no kernels to choose)
        with pytest.raises(ValueError, match="Invalid"):
            AdamWMSAMScheduleFreeReference(_params(), **{key: value})
    json_value = list(value) if isinstance(value, tuple) else value
    with pytest.raises(ConfigError, match=rf"optimizer.params.{key}: invalid value"):
        optimizer_kwargs_from_config({"type": "AdamWMSAMScheduleFree", "params": {key: json_value}})


def test_reference_does_not_import_the_optimizer():
    import ast
    import inspect
    from sharded_msam_sf import reference
    imported = set()
    for n in ast.walk(ast.parse(inspect.getsource(reference))):
        if isinstance(n, ast.ImportFrom):
            imported |= {n.module or ""} | {a.name for a in n.names}
    assert "optimizer" not in imported and "hyperparams" in imported


@pytest.mark.parametrize("key, value, message", [
    ("lr", float("nan"), r"Invalid learning rate \(lr\): nan .* in param_groups\[1\] \(checked by step\(\)\)"),
    ("lr", True, r"Invalid learning rate \(lr\): True"),
    ("eps", float("inf"), r"Invalid epsilon value \(eps\): inf"),
    ("betas", (0.9, 1.5), r"Invalid beta parameter at index 1: 1.5"),
    ("sam_mode", "two_pass", r"Invalid sam_mode: param_groups\[0\] has 'two_pass' but this optimizer runs 'one_pass'"),
])
def test_hyperparameters_are_checked_again_at_step_time(key, value, message):
    """A value written into param_groups after construction is refused by the next step(),
    before anything changes."""
    ps = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))]
    opt = AdamWMSAMScheduleFree([{"params": ps[:1]}, {"params": ps[1:]}])
    opt.train()
    for p in ps:
        p.grad = torch.ones(3)
    opt.step()
    before = [p.detach().clone() for p in ps]
    opt.param_groups[1 if key != "sam_mode" else 0][key] = value
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before)) and opt.param_groups[0]["k"] == 1


# ---------------------------------------------------------------- params the optimizer refuses
def test_same_param_twice_in_one_group():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="duplicate parameters"):
        AdamWMSAMScheduleFree([p, p])


def test_same_param_in_two_groups():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        AdamWMSAMScheduleFree([{"params": [p]}, {"params": [p]}])
    opt = AdamWMSAMScheduleFree([p])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


def test_complex_params_are_refused():
    """v would take g·g (complex) instead of |g|²: refused, with the way out."""
    c = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"can't optimize a complex Tensor .*torch.view_as_real"):
        AdamWMSAMScheduleFree([c])


def test_int_params_are_refused():
    with pytest.raises(ValueError, match=r"can't optimize a Tensor of dtype torch.int64"):
        AdamWMSAMScheduleFree([torch.zeros(3, dtype=torch.int64)])


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = AdamWMSAMScheduleFree(emb.parameters())
    opt.train()
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="AdamWMSAMScheduleFree does not support sparse gradients"):
        opt.step()


def test_meta_params_are_refused_at_the_first_step():
    """Building the optimizer on meta params is allowed (deferred init); stepping them is not."""
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    opt = AdamWMSAMScheduleFree([p])
    opt.train()
    p.grad = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match="can't step a parameter on the meta device"):
        opt.step()


def test_add_param_group_after_train_joins_in_train_mode():
    """The new group must be in the optimizer's mode: step() works, and eval() moves it to x."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = AdamWMSAMScheduleFree([a], lr=0.1, rho=0.0)   # (rho = 0: p holds y, no ascent on top)
    opt.train()
    opt.add_param_group({"params": [b]})
    assert opt.param_groups[1]["train_mode"]
    for _ in range(3):
        a.grad, b.grad = torch.ones(3), torch.ones(3)
        opt.step()
    assert opt.param_groups[1]["k"] == 3
    y_b = b.detach().clone()
    opt.eval()
    assert not torch.equal(b.detach(), y_b)  # b went y → x with the rest
    z = opt.state[b]["z"]
    assert torch.allclose(b.detach(), y_b.lerp(z, 1 - 1 / 0.9), atol=1e-6)


def test_add_param_group_in_eval_mode_stays_in_eval_mode():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = AdamWMSAMScheduleFree([a])
    opt.add_param_group({"params": [b]})
    assert not opt.param_groups[1]["train_mode"]


def test_add_param_group_bad_value_leaves_the_optimizer_unchanged():
    a = torch.nn.Parameter(torch.ones(3))
    opt = AdamWMSAMScheduleFree([a])
    with pytest.raises(ValueError, match="Invalid rho"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "rho": -1.0})
    assert len(opt.param_groups) == 1
