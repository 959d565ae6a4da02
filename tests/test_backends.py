"""The engine seam (sharded_msam_sf.backends): the rule that picks a back end, and the
per-parameter shares that turn local sums of squares into the global one."""
from __future__ import annotations

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree
from sharded_msam_sf.backends import (LOCAL, RULES, Backend, LocalBackend, Reduction, Share, engine_kind,
                                      resolve_backend)
from tests.harness import run_ranks


def test_the_rule_order():
    assert [name for name, _, _ in RULES] == ["deepspeed", "fsdp2", "fsdp1", "ddp", "local"]


def test_plain_params_get_the_local_backend():
    ps = [torch.nn.Parameter(torch.zeros(3))]
    assert engine_kind(ps) == "local"
    backend = resolve_backend(ps)
    assert type(backend) is LocalBackend and not backend.reduction.communicates
    assert backend.share(ps[0]) == Share(LOCAL, 1) and backend.process_group is None
    stats = torch.tensor([4.0, 0.0], dtype=torch.float64)
    backend.all_reduce_(stats)
    assert stats.tolist() == [4.0, 0.0]


def test_explicit_backend_wins_and_is_checked():
    ours = LocalBackend()
    assert AdamWMSAMScheduleFree([torch.nn.Parameter(torch.zeros(2))], backend=ours).backend is ours
    with pytest.raises(TypeError, match="backend must be a sharded_msam_sf.backends.Backend, got str"):
        AdamWMSAMScheduleFree([torch.nn.Parameter(torch.zeros(2))], backend="ddp")


def test_deepspeed_zero3_params_are_recognised_first():
    p = torch.nn.Parameter(torch.zeros(2))
    p.ds_id = 0  # what ZeRO-3 puts on the parameters it partitions
    assert engine_kind([p], process_group=object()) == "deepspeed"


def test_optimizer_builds_on_zero3_partitioned_params():
    """What HF ``from_pretrained`` under ZeRO-3 hands the optimizer: params that ``zero.Init``
    already partitioned (``ds_id``). The rule's back end must import and bind late (it once named a
    module that had been renamed: ``ModuleNotFoundError`` at construction)."""
    from sharded_msam_sf.backends.zero import DeepSpeedBackend
    params = [torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.zeros(0))]
    for i, p in enumerate(params):
        p.ds_id = i
    for mode in ("one_pass", "two_pass"):
        opt = AdamWMSAMScheduleFree(params, sam_mode=mode)
        assert isinstance(opt.backend, DeepSpeedBackend), type(opt.backend)


def test_share_replicas_are_validated():
    with pytest.raises(ValueError, match="Invalid replicas: 0"):
        Share(LOCAL, 0)
    assert Reduction.of([]) == Reduction()


def _shares(rank, world):
    import torch.distributed as dist
    world_group = dist.group.WORLD
    out = {}
    # replicated over both ranks: summed, divided by 2 -> each rank's own (identical) value
    stats = torch.tensor([3.0, 5.0, 0.0], dtype=torch.float64)
    Reduction.of([Share(world_group, 2)] * 2).apply_(stats)
    out["replicated"] = stats.tolist()
    # sharded over both ranks: the local sums add up; the flag of one rank reaches both
    stats = torch.tensor([1.0 + rank, 0.0, float(rank == 1)], dtype=torch.float64)
    Reduction.of([Share(world_group, 1)]).apply_(stats)
    out["sharded"] = stats.tolist()
    # a mix of replica counts over one rank set (tensor parallelism) is weighted: the optimizer divides
    # each local sum by its count before the all-reduce, and nothing is divided after it
    mixed = Reduction.of([Share(world_group, 1), Share(world_group, 2)])
    stats = torch.tensor([1.0 + rank, 0.0], dtype=torch.float64)
    mixed.apply_(stats)
    out["weighted"] = (mixed.weighted, mixed.replicas, stats.tolist())
    # different rank sets are refused, not double counted
    try:
        Reduction.of([Share(world_group, 1), Share(dist.new_group([0]), 1)])
        out["mixed"] = None
    except ValueError as e:
        out["mixed"] = str(e)
    backend = Backend()
    backend.reduction = Reduction.of([Share(world_group, 1)])
    out["repr"] = repr(backend)
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_shares, 2, timeout=120)


def test_replicated_shares_are_counted_once(two_ranks):
    for rank, r in two_ranks.items():
        assert r["replicated"] == [3.0, 5.0, 0.0], (rank, r)


def test_sharded_shares_add_up_and_carry_the_flag(two_ranks):
    for rank, r in two_ranks.items():
        assert r["sharded"] == [3.0, 0.0, 1.0], (rank, r)


def test_mixed_replicas_over_one_rank_set_are_weighted(two_ranks):
    for rank, r in two_ranks.items():
        assert r["weighted"] == (True, 1, [3.0, 0.0]), (rank, r)


def test_different_rank_sets_are_refused(two_ranks):
    for rank, r in two_ranks.items():
        assert r["mixed"] is not None and "different rank sets" in r["mixed"] and "process_group=" in r["mixed"], \
            (rank, r)
        assert r["repr"] == "Backend(group_ranks=[0, 1], replicas=1)"
