"""HSDP: FSDP2 ``fully_shard`` on a 2x2 mesh (Replicate, Shard(0)), and FSDP1 HYBRID_SHARD, 4 gloo
ranks: the norm is reduced over the shard group only (replicas are not counted twice)."""
from __future__ import annotations

import torch.distributed as dist

from tests import sharded_common as C
from tests.harness import run_ranks


def _hsdp(rank, world_size):
    for mode in ("one_pass", "two_pass"):
        # a NaN in rank 3's batch reaches the other replica group through HSDP's gradient all-reduce
        diff = C.check_equivalence("hsdp", mode, rank, world_size, nan_rank=3, nan_via_data=True)
        if rank == 0:
            print(f"MAXDIFF hsdp {mode} {diff:.3e}")
    model = C.wrap("hsdp", C.make_model())
    opt = C.AdamWMSAMScheduleFree(model.parameters())
    group = opt.backend.process_group
    assert dist.get_world_size(group) == 2
    assert dist.get_process_group_ranks(group) == ([0, 1] if rank < 2 else [2, 3])
    counts = C.check_collectives("hsdp", rank, world_size)
    if rank == 0:
        print(f"COLLECTIVES hsdp {counts}")
    # FSDP1 HYBRID_SHARD: the unit's process group is the shard group
    diff = C.check_equivalence("fsdp1_hybrid", "one_pass", rank, world_size, nan_rank=3, nan_via_data=True)
    if rank == 0:
        print(f"MAXDIFF fsdp1_hybrid one_pass {diff:.3e}")
    model = C.wrap("fsdp1_hybrid", C.make_model())
    assert dist.get_world_size(C.AdamWMSAMScheduleFree(model.parameters()).backend.process_group) == 2


def test_hsdp_2x2():
    run_ranks(_hsdp, 4, timeout=300)
