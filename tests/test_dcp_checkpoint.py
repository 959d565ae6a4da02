"""Sharded checkpoints with torch.distributed.checkpoint (FSDP2, FSDP1 both use_orig_params).

Saved at world size 2 in the middle of a run (one_pass: in train mode, at the ascent
point; two_pass: in eval mode), resumed into a freshly built, differently initialised
model and optimizer: at world size 2 the run is the uninterrupted one bit for bit; at
world sizes 1 and 4 (DCP reshards params and the state z, v, m) within float tolerance.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests import sharded_common as C
from tests.harness import run_ranks

ENGINES = ("fsdp2", "fsdp1_orig", "fsdp1_flat")
MODES = ("one_pass", "two_pass")
STEPS, SAVE_AT, SWITCH_AT = 8, 4, 2


def _build(engine, mode, seed):
    base = C.make_model(seed=seed)
    model = C.wrap(engine, C.clone_model(base))
    groups, _ = C.param_groups(engine, model, C.clone_model(base))
    return model, C.AdamWMSAMScheduleFree(groups, sam_mode=mode, **C.HP)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # flat "param_groups.<fqn>.<key>" entries: FSDP1 drops the sharded entries of params whose first
    # dim is smaller than the world size on ranks that hold none of them, and DCP then misreads a
    # nested param_groups list as a pre-2.4 checkpoint ("Missing key ... optimizer.param_groups")
    return StateDictOptions(flatten_optimizer_state_dict=True)


def save(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, opt, options=_options())
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path)


def load(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, opt, options=_options())
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_options())


def _save_and_resume_ws2(rank, world_size, root):
    out = {}
    for engine in ENGINES:
        for mode in MODES:
            path = os.path.join(root, f"{engine}-{mode}")
            kw = dict(mode=mode, dp_rank=rank, dp_size=world_size, switch_at=SWITCH_AT)
            # the uninterrupted run
            model, opt = _build(engine, mode, seed=3)
            C.run_loop(model, opt, steps=STEPS, **kw)
            full = C.full_weights(model)
            # the interrupted run: save after SAVE_AT steps (one_pass in train mode, two_pass in eval mode)
            model, opt = _build(engine, mode, seed=3)
            C.run_loop(model, opt, steps=SAVE_AT, final_eval=mode == "two_pass", **kw)
            scale = opt.param_groups[0]["ascent_scale"]
            save(model, opt, path)
            if rank == 0:
                torch.save(full, os.path.join(root, f"{engine}-{mode}.expected.pt"))
            # resume into a fresh, differently initialised model whose optimizer is in eval mode
            model, opt = _build(engine, mode, seed=11)
            load(model, opt, path)
            g = opt.param_groups[0]
            r = out[(engine, mode)] = dict(saved_scale=scale, k=g["k"], train_mode=g["train_mode"],
                                           scale=g["ascent_scale"])
            r["state_dtypes"] = {str(opt.state[p][key].dtype) for p in model.parameters()
                                 for key in ("z", "exp_avg_sq", "exp_avg") if key in opt.state.get(p, {})}
            C.run_loop(model, opt, steps=STEPS, start=SAVE_AT, **kw)
            resumed = C.full_weights(model)
            r["not_bit_identical"] = [k for k in full if not torch.equal(full[k], resumed[k])]
            r["diff"] = C.max_abs_diff(full, resumed)
    return out


def _resume_other_ws(rank, world_size, root):
    out = {}
    for engine in ENGINES:
        for mode in MODES:
            path = os.path.join(root, f"{engine}-{mode}")
            model, opt = _build(engine, mode, seed=11)
            load(model, opt, path)
            k = opt.param_groups[0]["k"]
            C.run_loop(model, opt, mode=mode, steps=STEPS, start=SAVE_AT, dp_rank=rank, dp_size=world_size,
                       switch_at=SWITCH_AT)
            resumed = C.full_weights(model)
            full = torch.load(os.path.join(root, f"{engine}-{mode}.expected.pt"), weights_only=True)
            out[(engine, mode)] = dict(k=k, diff=C.max_abs_diff(full, resumed))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(the root of the checkpoints saved at world size 2, every rank's measurements of the resume there)."""
    root = str(tmp_path_factory.mktemp("dcp"))
    return root, run_ranks(_save_and_resume_ws2, 2, root, timeout=300)


@pytest.fixture(scope="module")
def resharded(checkpoints):
    """{world size: every rank's measurements} of resuming the world-size-2 checkpoints at 1 and 4 ranks."""
    root, _ = checkpoints
    return {ws: run_ranks(_resume_other_ws, ws, root, timeout=300) for ws in (1, 4)}


CASES = [(e, m) for e in ENGINES for m in MODES]


@pytest.mark.parametrize("engine, mode", CASES)
def test_dcp_resume_restores_step_mode_and_ascent(checkpoints, engine, mode):
    for rank, res in checkpoints[1].items():
        r = res[(engine, mode)]
        assert (r["saved_scale"] != 0.0) == (mode == "one_pass"), (rank, r)   # one_pass saves at the ascent
        assert r["k"] == SAVE_AT and r["train_mode"] == (mode == "one_pass") and r["scale"] == r["saved_scale"], \
            (rank, r)


@pytest.mark.parametrize("engine, mode", CASES)
def test_dcp_resume_keeps_fp32_state(checkpoints, engine, mode):
    for rank, res in checkpoints[1].items():
        assert res[(engine, mode)]["state_dtypes"] == {"torch.float32"}, (rank, res[(engine, mode)])


@pytest.mark.parametrize("engine, mode", CASES)
def test_dcp_resume_same_world_size_bit_identical(checkpoints, engine, mode):
    for rank, res in checkpoints[1].items():
        r = res[(engine, mode)]
        assert not r["not_bit_identical"], (rank, r["not_bit_identical"], r["diff"])
    print(f"RESUME ws2 {engine} {mode} bit-identical")


@pytest.mark.parametrize("engine, mode", CASES)
@pytest.mark.parametrize("world_size", [1, 4])
def test_dcp_resume_resharded(resharded, world_size, engine, mode):
    for rank, res in resharded[world_size].items():
        r = res[(engine, mode)]
        assert r["k"] == SAVE_AT, (rank, r)
        assert r["diff"] <= C.TOL, (rank, r)
    print(f"RESUME ws{world_size} {engine} {mode} max|diff| {resharded[world_size][0][(engine, mode)]['diff']:.3e}")
