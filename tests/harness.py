"""The rank harness of the tests: :func:`sharded_msam_sf.testing.local_ranks.run_ranks` (shared with the benchmarks).

``run_ranks(fn, world_size, *args, timeout=180)`` runs ``fn(rank, world_size, *args)`` on that
many gloo ranks on 127.0.0.1, every rank asserting, and returns ``{rank: result}``.
"""
from sharded_msam_sf.testing.local_ranks import RanksFailed, free_port, run_ranks

__all__ = ["free_port", "run_ranks", "RanksFailed"]
