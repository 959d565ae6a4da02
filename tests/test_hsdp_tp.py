"""HSDP + tensor parallel on a replicate × shard × tp = 2 × 2 × 2 mesh (8 gloo ranks), built the
torchtitan way (``tests/tp_common.py``), with no extra optimizer arguments: equivalence with the
single-process optimizer in both modes, the group and replica count of every parameter, one
all-reduce per gradient evaluation; the same run with replicated parameters counted once per
rank fails the norm and ascent-scale checks. With a flattened (shard, tp) mesh made by the user
the replicate dim is dropped from the group instead of divided (and the run still equals the
single-process one).

One multi-process run (the ``runs`` fixture, one launch of 8 ranks: the module's whole cost)
measures everything; each test asserts one behaviour on every rank's measurements.
"""
from __future__ import annotations

import pytest

from tests import sharded_common as C
from tests import tp_common as T
from tests.harness import run_ranks

ENGINE = "hsdp_tp"


def _ranks(rank, world_size):
    out = T.measure_layout(ENGINE, rank, world_size)
    # last: the flattened mesh is kept by the root mesh, so every later back end uses its group
    T.mesh_for(ENGINE)["shard", "tp"]._flatten()
    out["flattened"] = T.shares_by_name(T.wrap(ENGINE, T.make_model()))
    # the group no longer spans the replicas: a NaN reaches them as it would in training, through
    # HSDP's gradient all-reduce (a NaN in data-parallel rank 3's batch), not written into one rank
    out["flattened_run"] = T.measure_one(ENGINE, "one_pass", rank, world_size, nan_rank=3, nan_via_data=True)
    return out


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_ranks, 8, timeout=500)


# the tests every TP layout shares (tests/tp_common.py), on this module's runs
test_equals_single_process = T.test_equals_single_process
test_replicas_counted_twice_would_fail = T.test_replicas_counted_twice_would_fail
test_every_parameter_counted_once_over_all_ranks = T.test_every_parameter_counted_once_over_all_ranks
test_one_all_reduce_per_gradient_and_none_in_train_eval = T.test_one_all_reduce_per_gradient_and_none_in_train_eval


def test_a_flattened_group_drops_the_replicate_dim(runs):
    for rank, r in runs.items():
        f = r["flattened"]
        assert f["group"] == ([0, 1, 2, 3] if rank < 4 else [4, 5, 6, 7]), (rank, f["group"])
        for name in ("blocks.0.up.weight", "blocks.1.down.weight"):
            assert f[name] == 1, (rank, name, f[name])
        for name in ("blocks.0.down.bias", "blocks.0.norm.weight", "norm.weight", "emb.weight", "pos"):
            assert f[name] == 2, (rank, name, f[name])


@pytest.mark.parametrize("check", C.EQUIVALENCE_CHECKS)
def test_a_flattened_group_equals_single_process(runs, check):
    C.assert_on_every_rank(runs, "flattened_run", C.EQUIVALENCE_CHECKS[check])
    if check == "final_weights":
        print(f"MAXDIFF {ENGINE}-flattened one_pass {max(r['flattened_run']['diff'] for r in runs.values()):.3e}")

