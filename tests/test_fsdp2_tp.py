"""FSDP2 + tensor parallel on a dp × tp = 2 × 2 mesh (4 gloo ranks), built the torchtitan way
(``tests/tp_common.py``), with no extra optimizer arguments: equivalence with the single-process
optimizer in both modes, the group and replica count of every parameter, one all-reduce per
gradient evaluation — and the same run with replicated parameters counted once per rank
(replicas ignored) fails the norm and ascent-scale checks. Also the mesh rules' refusals and the
pipeline hook (``FSDP2Backend(..., pipeline_group=)``) on small DTensors.

One multi-process run (the ``runs`` fixture) measures everything; each test asserts one
behaviour on every rank's measurements.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from tests import tp_common as T
from tests.harness import run_ranks

ENGINE = "fsdp2_tp"


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _backend(params, **kw):
    from sharded_msam_sf.backends.fsdp2 import FSDP2Backend
    return FSDP2Backend(params, **kw)


def _summary(params, **kw) -> tuple:
    """(the group's ranks, weighted, each param's replica count) of the back end for ``params``."""
    backend = _backend(params, **kw)
    return (dist.get_process_group_ranks(backend.process_group), backend.reduction.weighted,
            [backend.share(p).replicas for p in params])


def _refusals(rank, world_size) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    model = T.wrap(ENGINE, T.make_model())
    params = list(model.parameters())
    tp = T.mesh_for(ENGINE)["tp"]
    partial = torch.nn.Parameter(DTensor.from_local(torch.ones(3), tp, [Partial()]))
    replicated = torch.nn.Parameter(distribute_tensor(torch.ones(3), T.mesh_for(ENGINE), [Replicate(), Replicate()]))
    other_root = torch.nn.Parameter(distribute_tensor(torch.ones(4), init_device_mesh("cpu", (4,)), [Shard(0)]))
    return dict(
        partial=_error(lambda: _backend(params + [partial])),
        plain=_error(lambda: _backend(params + [torch.nn.Parameter(torch.zeros(3))])),
        other_root=_error(lambda: _backend(params + [other_root])),
        process_group=_summary(params, process_group=dist.group.WORLD),
        all_replicated=_summary([replicated]),
    )


def _pipeline(rank, world_size) -> dict:
    """The pipeline hook on DTensors of two stages × two data-parallel ranks: (a) one root mesh
    with a "pp" dim, (b) one data-parallel mesh per stage (``DeviceMesh.from_group``)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def params_on(mesh):
        return [torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])),
                torch.nn.Parameter(distribute_tensor(torch.ones(3), mesh, [Replicate()]))]

    out = {}
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    in_root = params_on(mesh["dp"])
    out["pp_dim_without_hook"] = _error(lambda: _backend(in_root))
    out["pp_dim"] = _summary(in_root, pipeline_group=mesh.get_group("pp"))
    # (b): stage s holds ranks {2s, 2s+1}; this rank's stages are {rank % 2, rank % 2 + 2}
    dp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    singles = [dist.new_group([r]) for r in range(world_size)]
    stage_mesh = DeviceMesh.from_group(dp_groups[rank // 2], "cpu")
    out["mesh_per_stage"] = _summary(params_on(stage_mesh), pipeline_group=pp_groups[rank % 2])
    one_rank = DeviceMesh.from_group(singles[rank], "cpu")
    out["stages_not_the_world"] = _error(lambda: _backend(params_on(one_rank), pipeline_group=pp_groups[rank % 2]))
    return out


def _ranks(rank, world_size):
    out = T.measure_layout(ENGINE, rank, world_size)
    out["refusals"] = _refusals(rank, world_size)
    out["pipeline"] = _pipeline(rank, world_size)
    return out


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_ranks, 4, timeout=400)


# the tests every TP layout shares (tests/tp_common.py), on this module's runs
test_equals_single_process = T.test_equals_single_process
test_replicas_counted_twice_would_fail = T.test_replicas_counted_twice_would_fail
test_every_parameter_counted_once_over_all_ranks = T.test_every_parameter_counted_once_over_all_ranks
test_one_all_reduce_per_gradient_and_none_in_train_eval = T.test_one_all_reduce_per_gradient_and_none_in_train_eval


@pytest.mark.parametrize("case, message", [
    ("partial", "Partial placement"),
    ("plain", "plain tensors next to DTensor"),
    ("other_root", "different device meshes.*process_group="),
])
def test_refused(runs, case, message):
    for rank, r in runs.items():
        assert re.search(message, r["refusals"][case]), (rank, r["refusals"][case])


def test_process_group_is_one_group_one_replica(runs):
    for rank, r in runs.items():
        group, weighted, replicas = r["refusals"]["process_group"]
        assert group == [0, 1, 2, 3] and not weighted and set(replicas) == {1}, (rank, r["refusals"]["process_group"])


def test_a_parameter_replicated_on_the_whole_mesh_counts_once(runs):
    for rank, r in runs.items():
        assert r["refusals"]["all_replicated"] == ([0, 1, 2, 3], False, [4]), (rank, r["refusals"]["all_replicated"])


def test_pipeline_dim_in_the_root_mesh_is_summed_never_a_replica(runs):
    for rank, r in runs.items():
        p = r["pipeline"]
        assert "pipeline_group=" in p["pp_dim_without_hook"], (rank, p["pp_dim_without_hook"])
        # (Shard over dp, Replicate over dp): summed over all four ranks; only dp's 2 copies are replicas
        assert p["pp_dim"] == ([0, 1, 2, 3], True, [1, 2]), (rank, p["pp_dim"])


def test_mesh_per_stage_reduces_over_the_world(runs):
    for rank, r in runs.items():
        p = r["pipeline"]
        assert p["mesh_per_stage"] == ([0, 1, 2, 3], True, [1, 2]), (rank, p["mesh_per_stage"])
        assert "process_group=" in p["stages_not_the_world"] and "stages" in p["stages_not_the_world"], (
            rank, p["stages_not_the_world"])
