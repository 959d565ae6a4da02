"""FSDP2 ``fully_shard`` (1-D mesh, 2 gloo ranks): equivalence with the single-process
optimizer, the global norm, the collectives per step, NaN skips, stale roots, bf16."""
from __future__ import annotations

import torch

from tests import sharded_common as C
from tests.harness import run_ranks


def _equivalence(rank, world_size):
    from sharded_msam_sf.backends.fsdp2 import FSDP2Backend
    for mode in ("one_pass", "two_pass"):
        diff = C.check_equivalence("fsdp2", mode, rank, world_size)
        if rank == 0:
            print(f"MAXDIFF fsdp2 {mode} {diff:.3e}")
    # the back end found the three fully_shard modules from the params alone, and model= finds the same
    model = C.wrap("fsdp2", C.make_model())
    a = C.AdamWMSAMScheduleFree(model.parameters())
    b = C.AdamWMSAMScheduleFree(model.parameters(), model=model)
    assert isinstance(a.backend, FSDP2Backend) and len(a.backend.fsdp_modules) == 3
    assert {id(m) for m in a.backend.fsdp_modules} == {id(m) for m in b.backend.fsdp_modules}
    # state is DTensor (DCP reshards it), sharded like the param; the math sees uneven / empty local shards
    C.run_loop(model, a, mode="one_pass", steps=2, dp_rank=rank, dp_size=world_size)
    for p in model.parameters():
        for key in ("z", "exp_avg_sq", "exp_avg"):
            s = a.state[p][key]
            assert type(s).__name__ == "DTensor" and s.placements == p.placements
            assert s.to_local().shape == p.to_local().shape
    assert any(p.to_local().numel() == 0 for p in model.parameters()) == (rank == 1)


def test_fsdp2_equivalence_norm_nan_switch():
    run_ranks(_equivalence, 2, timeout=240)


def _stale_root(rank, world_size):
    # eval() after an eval forward must change what the next forward computes with
    model = C.wrap("fsdp2", C.make_model())
    opt = C.AdamWMSAMScheduleFree(model.parameters(), lr=0.05)
    C.run_loop(model, opt, mode="one_pass", steps=3, dp_rank=rank, dp_size=world_size, final_eval=False)
    x, _ = C.global_batch(0)
    with torch.no_grad():
        at_y = model(x)            # leaves the root unsharded
        opt.eval()                 # y -> x in the shards
        at_x = model(x)
        opt.train()
        back = model(x)
    assert not torch.equal(at_y, at_x), "eval() was invisible to the next forward (stale unsharded root)"
    assert torch.allclose(back, at_y, atol=1e-6), (back - at_y).abs().max()


def _collectives(rank, world_size):
    counts = C.check_collectives("fsdp2", rank, world_size)
    if rank == 0:
        print(f"COLLECTIVES fsdp2 {counts}")


def _mixed_precision(rank, world_size):
    base = C.make_model(seed=3)
    ref = C.clone_model(base)
    model = C.wrap("fsdp2", C.clone_model(base), mp=True)
    opt = C.AdamWMSAMScheduleFree(model.parameters(), **C.HP)
    C.run_loop(model, opt, mode="one_pass", steps=6, dp_rank=rank, dp_size=world_size, switch_at=2)
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.to_local().dtype == torch.float32
        for key in ("z", "exp_avg_sq", "exp_avg"):
            assert opt.state[p][key].dtype == torch.float32 and opt.state[p][key].to_local().dtype == torch.float32
    ref_opt = C.AdamWMSAMScheduleFree(ref.parameters(), **C.HP)
    C.run_loop(ref, ref_opt, mode="one_pass", steps=6, dp_rank=0, dp_size=1, switch_at=2)
    diff = C.max_abs_diff(C.full_weights(model), {k: v.float() for k, v in ref.state_dict().items()})
    assert diff < 3e-2, diff   # bf16 forward/backward against an fp32 control
    if rank == 0:
        print(f"MAXDIFF fsdp2-bf16 one_pass {diff:.3e}")


def _errors(rank, world_size):
    import pytest
    model = C.wrap("fsdp2", C.make_model())
    extra = torch.nn.Parameter(torch.zeros(3))   # a replicated plain tensor next to the shards
    with pytest.raises(ValueError, match="fully_shard"):
        C.AdamWMSAMScheduleFree(list(model.parameters()) + [extra])


def _misc(rank, world_size):
    _errors(rank, world_size)
    _stale_root(rank, world_size)
    _collectives(rank, world_size)
    _mixed_precision(rank, world_size)


def test_fsdp2_stale_root_collectives_bf16():
    run_ranks(_misc, 2, timeout=240)
