"""The fused step on sharded state (2 gloo ranks): FSDP2 DTensor shards (uneven and
empty), FSDP1 flat params, DeepSpeed ZeRO-2/3 flat partitions, against the
single-process control on the same global batch — the compiled kernels see only the
local shards and the one all-reduce of the stats makes the norm global."""
from __future__ import annotations

import json

import pytest

from sharded_msam_sf import kernels as K
from tests.harness import run_ranks

pytestmark = pytest.mark.skipif(not K.compile_available("cpu"), reason="torch.compile unavailable on CPU")


FSDP_CASES = (("fsdp2", "one_pass"), ("fsdp2", "two_pass"), ("fsdp1_flat", "one_pass"))


def _fsdp_ranks(rank, world_size):
    from sharded_msam_sf import kernels as K
    from tests import sharded_common as C
    out = {}
    for engine, mode in FSDP_CASES:
        before = K.compile_counters()["calls"]
        out[(engine, mode)] = C.measure_equivalence(engine, mode, rank, world_size, opt_kwargs={"fused": True})
        out[(engine, mode)]["compiled_calls"] = K.compile_counters()["calls"] - before
    return out


@pytest.fixture(scope="module")
def fsdp_runs():
    return run_ranks(_fsdp_ranks, 2, timeout=400)


@pytest.mark.parametrize("check", ["fused_kernels_used", "global_norm", "ascent_scales", "nan_skips", "eval_loss",
                                   "final_weights"])
@pytest.mark.parametrize("engine, mode", FSDP_CASES)
def test_fused_fsdp2_fsdp1_equal_single_process(fsdp_runs, engine, mode, check):
    from tests import sharded_common as C
    if check == "fused_kernels_used":
        for rank, r in fsdp_runs.items():
            assert r[(engine, mode)]["compiled_calls"] > 0, (rank, "the fused kernels were not used")
        return
    C.assert_on_every_rank(fsdp_runs, (engine, mode), C.EQUIVALENCE_CHECKS[check])


def _ds_ranks(rank, world, out_path):
    from sharded_msam_sf import kernels as K
    from tests import ds_scenarios as S
    refs = {m: S.reference_run(4, m, switch_at=2) for m in ("one_pass", "two_pass")}  # foreach control
    multi_calls = []
    real_stats = K.multi_tensor.stats
    K.multi_tensor.stats = lambda *a: (multi_calls.append(1), real_stats(*a))[1]
    K.AUTO_MIN_NUMEL = 1   # the default (fused=None) now takes a fused path for every partition of the tiny model
    results = {}
    # compiled: the Inductor kernels (CUDA's path, and the CPU's without the C++ kernel);
    # multi: the multi-tensor C++ kernel (the CPU default for fp32)
    for stage, mode, kernel in ((2, "one_pass", "compiled"), (2, "two_pass", "compiled"), (3, "one_pass", "compiled"),
                                (2, "one_pass", "multi"), (3, "two_pass", "multi")):
        K.MULTI_TENSOR = kernel == "multi"
        before, multi_before = K.compile_counters()["calls"], len(multi_calls)
        engine, opt = S.make_engine(S.ds_config(stage, "fp32", mode))
        opt.train()
        assert all(S.ds_train(engine, opt, 4, mode, switch_at=2))
        opt.eval()
        if kernel == "compiled":
            assert K.compile_counters()["calls"] > before, "the compiled kernels were not used"
        else:
            assert len(multi_calls) > multi_before, "the multi-tensor kernel was not used"
        results[f"zero{stage}/{mode}/{kernel}"] = max(S.max_diff(opt.eval_state_dict(), refs[mode]),
                                                      S.max_diff(S.module_weights(engine), refs[mode]))
        engine.destroy()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    assert max(results.values()) <= 1e-5, results


@pytest.mark.slow
def test_fused_deepspeed_zero23_equal_single_process(tmp_path):
    from tests.ds_scenarios import build_shm_op
    build_shm_op()
    run_ranks(_ds_ranks, 2, str(tmp_path / "ds.json"), timeout=500)
