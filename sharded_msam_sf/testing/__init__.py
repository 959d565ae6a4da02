"""Harnesses for the tests and the benchmarks (not used by the optimizer): :mod:`.local_ranks`
(N local gloo ranks in one call, ``run_ranks``) and :mod:`.comm_count` (``CommCounter``: the
collectives a piece of code issues, calls and bytes per kind)."""
