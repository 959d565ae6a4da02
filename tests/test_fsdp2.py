"""FSDP2 ``fully_shard`` (1-D mesh, 2 gloo ranks): equivalence with the single-process
optimizer (the global norm, ascent scales, NaN skips, eval losses, weights), the back
end's modules and DTensor state, stale roots, the collectives per step, bf16 mixed
precision against a control under the same precision policy.

One multi-process run (the ``runs`` fixture) measures everything; each test asserts one
behaviour on every rank's measurements.
"""
from __future__ import annotations

import pytest
import torch

from tests import sharded_common as C
from tests.harness import run_ranks

MODES = ("one_pass", "two_pass")


def _backend_and_state(rank, world_size):
    from sharded_msam_sf.backends.fsdp2 import FSDP2Backend
    model = C.wrap("fsdp2", C.make_model())
    a = C.AdamWMSAMScheduleFree(model.parameters())
    b = C.AdamWMSAMScheduleFree(model.parameters(), model=model)
    out = dict(is_fsdp2=isinstance(a.backend, FSDP2Backend), n_modules=len(a.backend.fsdp_modules),
               same_modules={id(m) for m in a.backend.fsdp_modules} == {id(m) for m in b.backend.fsdp_modules})
    C.run_loop(model, a, mode="one_pass", steps=2, dp_rank=rank, dp_size=world_size)
    out["state"] = [(type(a.state[p][k]).__name__ == "DTensor" and a.state[p][k].placements == p.placements,
                     tuple(a.state[p][k].to_local().shape) == tuple(p.to_local().shape))
                    for p in model.parameters() for k in ("z", "exp_avg_sq", "exp_avg")]
    out["has_empty_shard"] = any(p.to_local().numel() == 0 for p in model.parameters())
    return out


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
    return dict(eval_visible=not torch.equal(at_y, at_x), train_back=float((back - at_y).abs().max()))


def _plain_param_error(rank, world_size):
    model = C.wrap("fsdp2", C.make_model())
    extra = torch.nn.Parameter(torch.zeros(3))   # a replicated plain tensor next to the shards
    try:
        C.AdamWMSAMScheduleFree(list(model.parameters()) + [extra])
    except ValueError as e:
        return str(e)
    return None


def _ranks(rank, world_size):
    out = {mode: C.measure_equivalence("fsdp2", mode, rank, world_size) for mode in MODES}
    out["backend"] = _backend_and_state(rank, world_size)
    out["stale_root"] = _stale_root(rank, world_size)
    out["collectives"] = C.measure_collectives("fsdp2", rank, world_size)
    out["bf16"] = C.measure_bf16("fsdp2", rank, world_size)
    out["plain_param_error"] = _plain_param_error(rank, world_size)
    return out


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_ranks, 2, timeout=300)


@pytest.mark.parametrize("check", C.EQUIVALENCE_CHECKS)
@pytest.mark.parametrize("mode", MODES)
def test_equals_single_process(runs, mode, check):
    C.assert_on_every_rank(runs, mode, C.EQUIVALENCE_CHECKS[check])
    if check == "final_weights":
        print(f"MAXDIFF fsdp2 {mode} {runs[0][mode]['diff']:.3e}")


def test_backend_finds_the_fully_shard_modules_from_the_params(runs):
    for rank, r in runs.items():
        b = r["backend"]
        assert b["is_fsdp2"] and b["n_modules"] == 3 and b["same_modules"], (rank, b)


def test_state_is_dtensor_sharded_like_the_param(runs):
    for rank, r in runs.items():
        assert all(placed and shaped for placed, shaped in r["backend"]["state"]), (rank, r["backend"]["state"])
    # the math sees uneven and empty local shards: the last layer has none on rank 1
    assert [runs[r]["backend"]["has_empty_shard"] for r in sorted(runs)] == [False, True]


def test_eval_after_an_eval_forward_is_seen_by_the_next_forward(runs):
    for rank, r in runs.items():
        assert r["stale_root"]["eval_visible"], (rank, "eval() was invisible to the next forward (stale root)")
        assert r["stale_root"]["train_back"] <= 1e-6, (rank, r["stale_root"])


@pytest.mark.parametrize("mode", MODES)
def test_one_all_reduce_per_gradient_and_none_in_train_eval(runs, mode):
    per_step = {"one_pass": 1, "two_pass": 2}[mode]
    C.assert_on_every_rank(runs, "collectives", lambda m: C.check_collectives(m[mode], per_step=per_step))


def test_bf16_mixed_precision_keeps_fp32_shards_and_state(runs):
    for rank, r in runs.items():
        assert r["bf16"]["param_dtypes"] == {"torch.float32"}, (rank, r["bf16"]["param_dtypes"])
        assert r["bf16"]["state_dtypes"] == {"torch.float32"}, (rank, r["bf16"]["state_dtypes"])


def test_bf16_equals_control_under_the_same_precision_policy(runs):
    for rank, r in runs.items():
        b = r["bf16"]
        assert b["diff"] <= C.TOL, (rank, b["diff"], b["diff_vs_fp32"])
        for a, c in zip(b["eval_loss"], b["ref_eval_loss"]):
            assert abs(a - c) <= C.TOL, (rank, b["eval_loss"], b["ref_eval_loss"])
    print(f"MAXDIFF fsdp2-bf16 one_pass {runs[0]['bf16']['diff']:.3e} "
          f"(vs an fp32 control: {runs[0]['bf16']['diff_vs_fp32']:.3e})")


def test_plain_params_next_to_shards_are_refused(runs):
    for rank, r in runs.items():
        assert r["plain_param_error"] is not None and "fully_shard" in r["plain_param_error"], (rank, r)
