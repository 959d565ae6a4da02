"""The rank harness (sharded_msam_sf.testing.local_ranks.run_ranks) shared by the tests and benchmarks:
results per rank, every failing rank's traceback, hung ranks killed, and a rank that dies
after reporting success (a gloo abort at exit) is a failure — never rerun."""
from __future__ import annotations

import pytest

from sharded_msam_sf.testing.local_ranks import RanksFailed, run_ranks


def _results(rank, world):
    import torch.distributed as dist
    t = __import__("torch").tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world, "sum": float(t)}


def test_returns_every_ranks_result():
    assert run_ranks(_results, 2, timeout=120) == {r: {"rank": r, "world": 2, "sum": 3.0} for r in (0, 1)}


def _rank1_raises(rank, world):
    if rank == 1:
        raise ValueError("rank one is broken")


def test_a_failing_rank_is_reported_with_its_traceback():
    # (rank 0 then fails in the harness's closing barrier: its peer is gone)
    with pytest.raises(RanksFailed, match=r"(?s)rank\(s\) failed.*--- rank 1 ---.*ValueError: rank one is broken"):
        run_ranks(_rank1_raises, 2, timeout=120)


def _rank0_hangs(rank, world):
    import time
    if rank == 0:
        time.sleep(600)


def test_a_hung_rank_is_killed_and_named():
    # (rank 1 waits for it in the harness's closing barrier: both are killed)
    with pytest.raises(RanksFailed, match=r"ranks \[0(, 1)?\] still running after 20 s: killed"):
        run_ranks(_rank0_hangs, 2, timeout=20)


def _abort_at_exit(rank, world):
    import os
    import signal

    from sharded_msam_sf import teardown
    if rank == 1:  # what a gloo thread outliving the interpreter does: SIGABRT after the work is done
        teardown.exit_process = lambda code: os.kill(os.getpid(), signal.SIGABRT)
    return rank


def test_an_abort_after_success_fails_without_a_rerun():
    with pytest.raises(RanksFailed, match=r"non-zero codes: \[\(1, -6\)\].*SIGABRT"):
        run_ranks(_abort_at_exit, 2, timeout=120)
