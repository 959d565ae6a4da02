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
import torch.distributed as dist

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
            assert (scale != 0.0) == (mode == "one_pass")
            save(model, opt, path)
            if rank == 0:
                torch.save(full, os.path.join(root, f"{engine}-{mode}.expected.pt"))
            # resume into a fresh, differently initialised model whose optimizer is in eval mode
            model, opt = _build(engine, mode, seed=11)
            load(model, opt, path)
            g = opt.param_groups[0]
            assert g["k"] == SAVE_AT and g["train_mode"] == (mode == "one_pass") and g["ascent_scale"] == scale
            for p in model.parameters():
                for key in ("z", "exp_avg_sq", "exp_avg"):
                    if key in opt.state.get(p, {}):
                        assert opt.state[p][key].dtype == torch.float32
            C.run_loop(model, opt, steps=STEPS, start=SAVE_AT, **kw)
            resumed = C.full_weights(model)
            bad = [k for k in full if not torch.equal(full[k], resumed[k])]
            assert not bad, (engine, mode, bad, C.max_abs_diff(full, resumed))
            if rank == 0:
                print(f"RESUME ws2 {engine} {mode} bit-identical")


def _resume_other_ws(rank, world_size, root):
    for engine in ENGINES:
        for mode in MODES:
            path = os.path.join(root, f"{engine}-{mode}")
            model, opt = _build(engine, mode, seed=11)
            load(model, opt, path)
            assert opt.param_groups[0]["k"] == SAVE_AT
            C.run_loop(model, opt, mode=mode, steps=STEPS, start=SAVE_AT, dp_rank=rank, dp_size=world_size,
                       switch_at=SWITCH_AT)
            resumed = C.full_weights(model)
            full = torch.load(os.path.join(root, f"{engine}-{mode}.expected.pt"), weights_only=True)
            diff = C.max_abs_diff(full, resumed)
            assert diff <= C.TOL, (engine, mode, world_size, diff)
            if rank == 0:
                print(f"RESUME ws{world_size} {engine} {mode} max|diff| {diff:.3e}")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dcp"))
    run_ranks(_save_and_resume_ws2, 2, root, timeout=300)
    return root


def test_dcp_resume_same_world_size_bit_identical(checkpoints):
    assert os.path.exists(os.path.join(checkpoints, "fsdp2-one_pass.expected.pt"))


@pytest.mark.parametrize("world_size", [1, 4])
def test_dcp_resume_resharded(checkpoints, world_size):
    run_ranks(_resume_other_ws, world_size, checkpoints, timeout=300)
