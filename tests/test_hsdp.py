"""HSDP: FSDP2 ``fully_shard`` on a 2x2 mesh (Replicate, Shard(0)), and FSDP1 HYBRID_SHARD, 4 gloo
ranks: the norm is reduced over the shard group only (replicas are not counted twice).

One multi-process run (the ``runs`` fixture) measures everything; each test asserts one
behaviour on every rank's measurements.
"""
from __future__ import annotations

import pytest
import torch.distributed as dist

from tests import sharded_common as C
from tests.harness import run_ranks

MODES = ("one_pass", "two_pass")
SCENARIOS = (("hsdp", "one_pass"), ("hsdp", "two_pass"), ("fsdp1_hybrid", "one_pass"))


def _ranks(rank, world_size):
    out = {}
    for engine, mode in SCENARIOS:
        # a NaN in rank 3's batch reaches the other replica group through HSDP's gradient all-reduce
        out[(engine, mode)] = C.measure_equivalence(engine, mode, rank, world_size, nan_rank=3, nan_via_data=True)
    for engine in ("hsdp", "fsdp1_hybrid"):
        backend = C.AdamWMSAMScheduleFree(C.wrap(engine, C.make_model()).parameters()).backend
        out[("group", engine)] = (dist.get_process_group_ranks(backend.process_group), backend.reduction.replicas)
    out["collectives"] = C.measure_collectives("hsdp", rank, world_size)
    return out


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_ranks, 4, timeout=400)


@pytest.mark.parametrize("check", C.EQUIVALENCE_CHECKS)
@pytest.mark.parametrize("engine, mode", SCENARIOS)
def test_equals_single_process(runs, engine, mode, check):
    C.assert_on_every_rank(runs, (engine, mode), C.EQUIVALENCE_CHECKS[check])
    if check == "final_weights":
        print(f"MAXDIFF {engine} {mode} {runs[0][(engine, mode)]['diff']:.3e}")


@pytest.mark.parametrize("engine", ("hsdp", "fsdp1_hybrid"))
def test_norm_is_reduced_over_the_shard_group_only(runs, engine):
    for rank, r in runs.items():
        assert r[("group", engine)] == ([0, 1] if rank < 2 else [2, 3], 1), (rank, r[("group", engine)])


@pytest.mark.parametrize("mode", MODES)
def test_one_all_reduce_per_gradient_and_none_in_train_eval(runs, mode):
    per_step = {"one_pass": 1, "two_pass": 2}[mode]
    C.assert_on_every_rank(runs, "collectives", lambda m: C.check_collectives(m[mode], per_step=per_step))
