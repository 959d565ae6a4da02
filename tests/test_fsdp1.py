"""FSDP1 ``FullyShardedDataParallel`` (use_orig_params True and False, 2 gloo ranks):
equivalence with the single-process optimizer (the global norm, ascent scales, NaN skips,
eval losses, weights), the handles found with and without ``model=``, 1-D views and flat
padding, stale roots, the collectives per step, bf16 MixedPrecision against a control
under the same precision policy.

One multi-process run (the ``runs`` fixture) measures everything; each test asserts one
behaviour of one engine on every rank's measurements.
"""
from __future__ import annotations

import pytest
import torch

from tests import sharded_common as C
from tests.harness import run_ranks

ENGINES = ("fsdp1_orig", "fsdp1_flat")
MODES = ("one_pass", "two_pass")


def _backend_and_layout(engine, rank, world_size):
    from sharded_msam_sf.backends.fsdp1 import FSDP1Backend
    model = C.wrap(engine, C.make_model())
    a = C.AdamWMSAMScheduleFree(model.parameters())
    b = C.AdamWMSAMScheduleFree(model.parameters(), model=model)
    out = dict(is_fsdp1=isinstance(a.backend, FSDP1Backend), n_handles=len(a.backend.handles),
               same_handles={id(h) for h in a.backend.handles} == {id(h) for h in b.backend.handles})
    if engine == "fsdp1_orig":   # 1-D views, size 0 where this rank holds none of the param
        out["all_1d"] = all(p.ndim == 1 for p in model.parameters())
        out["has_empty_view"] = any(p.numel() == 0 for p in model.parameters())
    else:                        # padding in the flat shard stays zero in m, v, z and the param
        C.run_loop(model, a, mode="one_pass", steps=3, dp_rank=rank, dp_size=world_size, final_eval=False)
        nonzero = 0
        for p in model.parameters():
            pad = getattr(p, "_shard_numel_padded", 0)
            if pad:
                for t in (p, a.state[p]["z"], a.state[p]["exp_avg"], a.state[p]["exp_avg_sq"]):
                    nonzero += int(torch.count_nonzero(t.detach()[-pad:]))
        out["padding_nonzero"] = nonzero
        out["has_padding"] = any(getattr(p, "_shard_numel_padded", 0) for p in model.parameters())
    return out


def _stale_root(engine, rank, world_size):
    # eval() after an eval forward (the root keeps its unsharded flat param) is seen by the next forward
    model = C.wrap(engine, C.make_model())
    opt = C.AdamWMSAMScheduleFree(model.parameters(), lr=0.05)
    C.run_loop(model, opt, mode="one_pass", steps=3, dp_rank=rank, dp_size=world_size, final_eval=False)
    x, _ = C.global_batch(0)
    with torch.no_grad():
        at_y = model(x)
        opt.eval()
        at_x = model(x)
        opt.train()
        back = model(x)
    return dict(eval_visible=not torch.equal(at_y, at_x), train_back=float((back - at_y).abs().max()))


def _unit_not_found_error():
    # a flattened param whose FSDP unit is not in model=: the error names model=
    model = C.wrap("fsdp1_orig", C.make_model())
    try:
        C.AdamWMSAMScheduleFree(model.parameters(), model=torch.nn.Linear(2, 2))
    except ValueError as e:
        return str(e)
    return None


def _ranks(rank, world_size):
    out = {"not_found_error": _unit_not_found_error()}
    for engine in ENGINES:
        for mode in MODES:
            out[(engine, mode)] = C.measure_equivalence(engine, mode, rank, world_size)
        out[("backend", engine)] = _backend_and_layout(engine, rank, world_size)
        out[("stale_root", engine)] = _stale_root(engine, rank, world_size)
        out[("collectives", engine)] = C.measure_collectives(engine, rank, world_size)
        out[("bf16", engine)] = C.measure_bf16(engine, rank, world_size)
    return out


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_ranks, 2, timeout=400)


@pytest.mark.parametrize("check", C.EQUIVALENCE_CHECKS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("engine", ENGINES)
def test_equals_single_process(runs, engine, mode, check):
    C.assert_on_every_rank(runs, (engine, mode), C.EQUIVALENCE_CHECKS[check])
    if check == "final_weights":
        print(f"MAXDIFF {engine} {mode} {runs[0][(engine, mode)]['diff']:.3e}")


@pytest.mark.parametrize("engine", ENGINES)
def test_handles_found_from_the_params_as_with_model(runs, engine):
    for rank, r in runs.items():
        b = r[("backend", engine)]
        assert b["is_fsdp1"] and b["n_handles"] == 3 and b["same_handles"], (rank, b)


def test_orig_params_are_1d_views_some_empty(runs):
    for rank, r in runs.items():
        b = r[("backend", "fsdp1_orig")]
        assert b["all_1d"] and b["has_empty_view"], (rank, b)


def test_flat_padding_stays_zero(runs):
    for rank, r in runs.items():
        assert r[("backend", "fsdp1_flat")]["padding_nonzero"] == 0, (rank, r[("backend", "fsdp1_flat")])
    assert [runs[r][("backend", "fsdp1_flat")]["has_padding"] for r in sorted(runs)] == [False, True]


@pytest.mark.parametrize("engine", ENGINES)
def test_eval_after_an_eval_forward_is_seen_by_the_next_forward(runs, engine):
    for rank, r in runs.items():
        s = r[("stale_root", engine)]
        assert s["eval_visible"], (rank, "eval() was invisible to the next forward (stale root)")
        assert s["train_back"] <= 1e-6, (rank, s)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("engine", ENGINES)
def test_one_all_reduce_per_gradient_and_none_in_train_eval(runs, engine, mode):
    per_step = {"one_pass": 1, "two_pass": 2}[mode]
    C.assert_on_every_rank(runs, ("collectives", engine), lambda m: C.check_collectives(m[mode], per_step=per_step))


@pytest.mark.parametrize("engine", ENGINES)
def test_bf16_mixed_precision_keeps_fp32_shards_and_state(runs, engine):
    for rank, r in runs.items():
        b = r[("bf16", engine)]
        assert b["param_dtypes"] == {"torch.float32"} and b["state_dtypes"] == {"torch.float32"}, (rank, b)


@pytest.mark.parametrize("engine", ENGINES)
def test_bf16_equals_control_under_the_same_precision_policy(runs, engine):
    for rank, r in runs.items():
        b = r[("bf16", engine)]
        assert b["diff"] <= C.TOL, (rank, b["diff"], b["diff_vs_fp32"])
        for a, c in zip(b["eval_loss"], b["ref_eval_loss"]):
            assert abs(a - c) <= C.TOL, (rank, b["eval_loss"], b["ref_eval_loss"])
    b = runs[0][("bf16", engine)]
    print(f"MAXDIFF {engine}-bf16 one_pass {b['diff']:.3e} (vs an fp32 control: {b['diff_vs_fp32']:.3e})")


def test_unit_not_in_model_argument_names_model(runs):
    for rank, r in runs.items():
        assert r["not_found_error"] is not None and "model=" in r["not_found_error"], (rank, r["not_found_error"])
