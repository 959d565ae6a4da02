"""DDP (2 gloo ranks): the local back end is exact for replicas (no collective of ours),
and ``model=ddp`` adds one MAX all-reduce per gradient evaluation so that a NaN made
after DDP's all-reduce still skips the step everywhere."""
from __future__ import annotations

from tests import sharded_common as C
from tests.harness import run_ranks


def _ddp(rank, world_size):
    from sharded_msam_sf.backends import DDPBackend, LocalBackend
    for mode in ("one_pass", "two_pass"):
        # AdamWMSAMScheduleFree(ddp.parameters()): the local back end; a NaN in rank 1's batch
        # reaches every rank through DDP's gradient all-reduce, so all skip the step
        diff = C.check_equivalence("ddp", mode, rank, world_size, nan_via_data=True)
        if rank == 0:
            print(f"MAXDIFF ddp {mode} {diff:.3e}")
    model = C.wrap("ddp", C.make_model())
    assert isinstance(C.AdamWMSAMScheduleFree(model.parameters()).backend, LocalBackend)
    assert isinstance(C.AdamWMSAMScheduleFree(model.parameters(), model=model).backend, DDPBackend)
    counts = C.check_collectives("ddp", rank, world_size, expect_per_step={"one_pass": 0, "two_pass": 0})
    if rank == 0:
        print(f"COLLECTIVES ddp {counts}")


def test_ddp_local_backend():
    run_ranks(_ddp, 2, timeout=240)


def _ddp_model_arg(rank, world_size):
    # model=ddp: a NaN written into rank 1's gradient after DDP's all-reduce skips the step on both ranks
    for mode in ("one_pass", "two_pass"):
        diff = C.check_equivalence("ddp", mode, rank, world_size, pass_model=True)
        if rank == 0:
            print(f"MAXDIFF ddp(model=) {mode} {diff:.3e}")
    counts = C.check_collectives("ddp", rank, world_size, pass_model=True)
    if rank == 0:
        print(f"COLLECTIVES ddp(model=) {counts}")


def test_ddp_model_argument_syncs_skips():
    run_ranks(_ddp_model_arg, 2, timeout=240)
