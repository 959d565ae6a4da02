"""Late binding: the back end is resolved when the optimizer is first used and again when its params
change identity or kind. An optimizer built before ``fully_shard`` (its params then swapped by name,
as ``accelerate.prepare`` does) or before FSDP1 wraps the model (``use_orig_params=True``) follows the
single-process trajectory (2 gloo ranks, both modes); state made for the old params is carried over
when the new param is the same kind of tensor and refused otherwise; ``backend=`` stays as given.
"""
from __future__ import annotations

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree
from sharded_msam_sf.backends import LocalBackend
from tests import sharded_common as C
from tests.harness import run_ranks
from tests.models import batch, mse, tiny_mlp

MODES = ("one_pass", "two_pass")
ROUTES = ("fsdp2_swap", "fsdp1_orig")


def swap_by_name(opt, before: dict, model) -> None:
    """What ``accelerate.prepare`` does after ``fully_shard``: each param in the optimizer's groups is
    replaced by the module's param of the same name."""
    after = dict(model.named_parameters())
    by_id = {id(p): after[n] for n, p in before.items()}
    for g in opt.param_groups:
        g["params"] = [by_id[id(p)] for p in g["params"]]


def late_equivalence(route: str, mode: str, rank: int, world_size: int, steps: int = 6) -> dict:
    base = C.make_model(seed=3)
    ref, model = C.clone_model(base), C.clone_model(base)
    groups, _ = C.param_groups("fsdp2", model, ref)           # built on the plain model, by name
    opt = AdamWMSAMScheduleFree(groups, sam_mode=mode, **C.HP)
    opt.train()                                               # used before wrapping: binds LocalBackend
    before_kind = type(opt.backend).__name__
    named = dict(model.named_parameters())
    wrapped = C.wrap("fsdp2" if route == "fsdp2_swap" else "fsdp1_orig", model)
    if route == "fsdp2_swap":
        swap_by_name(opt, named, model)
    rec, ref_rec = {}, {}
    C.run_loop(wrapped, opt, mode=mode, steps=steps, dp_rank=rank, dp_size=world_size, switch_at=2, record=rec,
               final_eval=False)
    ref_opt = C.reference_run("fsdp2", wrapped, ref, mode=mode, steps=steps, switch_at=2, record=ref_rec,
                              final_eval=False)
    out = dict(before=before_kind, after=type(opt.backend).__name__, scales=rec["scale"],
               ref_scales=ref_rec["scale"], eval_loss=rec["eval_loss"], ref_eval_loss=ref_rec["eval_loss"])
    opt.eval()
    ref_opt.eval()
    theirs = {k: v.detach().float() for k, v in ref.state_dict().items()}
    out["diff"] = C.max_abs_diff(C.full_weights(wrapped), theirs)
    out["moved"] = C.max_abs_diff(theirs, {k: v.detach().float() for k, v in base.state_dict().items()})
    return out


def state_then_wrap(route: str, rank: int, world_size: int):
    """A step before wrapping, then the wrap: the state (full tensors) cannot serve the shards."""
    model = C.make_model(seed=3)
    opt = AdamWMSAMScheduleFree(model.parameters(), **C.HP)
    C.run_loop(model, opt, mode="one_pass", steps=1, dp_rank=rank, dp_size=world_size, final_eval=False)
    named = dict(model.named_parameters())
    wrapped = C.wrap("fsdp2" if route == "fsdp2_swap" else "fsdp1_orig", model)
    if route == "fsdp2_swap":
        swap_by_name(opt, named, model)
    try:
        C.run_loop(wrapped, opt, mode="one_pass", steps=2, start=1, dp_rank=rank, dp_size=world_size,
                   final_eval=False)
    except RuntimeError as e:
        return str(e)
    return None


def explicit_backend_stays(rank: int, world_size: int) -> str:
    model = C.make_model(seed=3)
    opt = AdamWMSAMScheduleFree(model.parameters(), backend=LocalBackend())
    named = dict(model.named_parameters())
    C.wrap("fsdp2", model)
    swap_by_name(opt, named, model)
    return type(opt.backend).__name__


def flat_params_left_behind(rank: int, world_size: int):
    """FSDP1 use_orig_params=False after the optimizer was built: the optimizer holds params the
    model no longer uses (no mark on them); the first step() finds no gradient and refuses."""
    model = C.make_model(seed=3)
    opt = AdamWMSAMScheduleFree(model.parameters(), **C.HP)
    wrapped = C.wrap("fsdp1_flat", model)
    try:
        C.run_loop(wrapped, opt, mode="one_pass", steps=1, dp_rank=rank, dp_size=world_size, final_eval=False)
    except RuntimeError as e:
        return str(e)
    return None


def _ranks(rank, world_size):
    out = {(route, mode): late_equivalence(route, mode, rank, world_size) for route in ROUTES for mode in MODES}
    out["state"] = {route: state_then_wrap(route, rank, world_size) for route in ROUTES}
    out["explicit"] = explicit_backend_stays(rank, world_size)
    out["flat"] = flat_params_left_behind(rank, world_size)
    return out


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_ranks, 2, timeout=240)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("route", ROUTES)
def test_built_before_wrapping_equals_single_process(runs, route, mode):
    expected = {"fsdp2_swap": "FSDP2Backend", "fsdp1_orig": "FSDP1Backend"}[route]
    for rank, r in runs.items():
        r = r[(route, mode)]
        assert r["before"] == "LocalBackend" and r["after"] == expected, (rank, r["before"], r["after"])
        assert r["moved"] > 1e-3 and r["diff"] <= C.TOL, (rank, r["diff"])
        for a, b in zip(r["scales"], r["ref_scales"]):
            assert abs(a - b) <= 1e-5 * max(abs(b), 1e-12), (rank, r["scales"], r["ref_scales"])
        for a, b in zip(r["eval_loss"], r["ref_eval_loss"]):
            assert abs(a - b) <= C.TOL, (rank, r["eval_loss"], r["ref_eval_loss"])
    print(f"MAXDIFF late-binding {route} {mode} {runs[0][(route, mode)]['diff']:.3e}")


@pytest.mark.parametrize("route", ROUTES)
def test_state_made_before_wrapping_is_refused(runs, route):
    for rank, r in runs.items():
        msg = r["state"][route]
        assert msg is not None and "wrapped or replaced" in msg and "before the first step()" in msg, (rank, msg)


def test_fsdp1_flat_wrapped_after_building_is_refused(runs):
    for rank, r in runs.items():
        assert r["flat"] is not None and "use_orig_params=False" in r["flat"], (rank, r["flat"])


def test_explicit_backend_stays_as_given(runs):
    assert all(r["explicit"] == "LocalBackend" for r in runs.values())


def test_same_kind_replacement_carries_the_state_over():
    # one process: a param replaced by an equal plain tensor keeps its z, v, m (re-keyed by position)
    model, twin = tiny_mlp(), tiny_mlp()
    x, y = batch()
    opt = AdamWMSAMScheduleFree(model.parameters(), lr=0.01)
    opt_twin = AdamWMSAMScheduleFree(twin.parameters(), lr=0.01)
    for o, m in ((opt, model), (opt_twin, twin)):
        o.train()
        mse(m, x, y).backward()
        o.step()
        o.zero_grad()
    new = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    opt.param_groups[0]["params"] = new
    mse(twin, x, y).backward()
    for p, q in zip(new, twin.parameters()):
        p.grad = q.grad.clone()
    opt.step()
    opt_twin.step()
    assert all(p in opt.state for p in new)
    assert all(torch.equal(p, q) for p, q in zip(new, twin.parameters()))


def test_bind_backend_pins_it():
    model = tiny_mlp()
    opt = AdamWMSAMScheduleFree(model.parameters())
    b = LocalBackend()
    opt.bind_backend(b)
    opt.param_groups[0]["params"] = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    assert opt.backend is b
    with pytest.raises(TypeError, match="backend must be"):
        opt.bind_backend(object())
