"""Run a function on N local gloo ranks (127.0.0.1, a free port): the tests' and benchmarks' harness.

``run_ranks(fn, world_size, *args, timeout=180)`` spawns ``world_size`` processes that each
call ``fn(rank, world_size, *args)`` inside an initialised gloo process group, and returns
``{rank: fn's return value}``. Every rank's failure is reported with its traceback; ranks
still running after ``timeout`` seconds are killed; a rank that reported success but then
exited non-zero (e.g. SIGABRT from a gloo thread at exit) fails too — nothing is rerun.
``fn`` must be importable (a module-level function) and its return value picklable.

Each rank sees the environment a launcher would give it (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT``), one
intra-op thread, and ends with a barrier, then :func:`~sharded_msam_sf.teardown.close_process_group`
outside any ``except`` clause (so the frames holding the function's engines are gone and
the collection joins every gloo thread before the interpreter finalizes).
"""
from __future__ import annotations

import os
import time
import traceback
from typing import Any, Callable, Dict

from ..launch_env import free_port

__all__ = ["run_ranks", "free_port", "RanksFailed"]


class RanksFailed(AssertionError):
    """Some rank raised, hung or exited abnormally (an AssertionError, so that pytest shows it as a failure)."""


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ok = False
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}")
        out = fn(rank, world_size, *args)
        dist.barrier()
        queue.put((rank, True, out))
        ok = True
    except BaseException:  # report every rank's failure, not only the first
        queue.put((rank, False, traceback.format_exc()))
    del fn, args
    from ..teardown import close_process_group, exit_process
    close_process_group()  # outside the except clause: see the module docstring
    exit_process(0 if ok else 1)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0) -> Dict[int, Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; ``{rank: result}``, or raise."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: Dict[int, Any] = {}
    failures: Dict[int, str] = {}
    deadline = time.monotonic() + timeout

    def drain() -> None:
        while not queue.empty():
            rank, ok, payload = queue.get()
            (results if ok else failures)[rank] = payload

    # read while waiting: a large result would otherwise block its rank on the pipe
    while len(results) + len(failures) < world_size and time.monotonic() < deadline:
        drain()
        if all(not p.is_alive() for p in procs):
            break
        time.sleep(0.02)
    for p in procs:
        p.join(max(0.0, min(30.0, deadline - time.monotonic())))
    drain()
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    problems = []
    if failures:
        problems.append(f"{len(failures)} rank(s) failed:\n" +
                        "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items())))
    if hung:
        problems.append(f"ranks {hung} still running after {timeout:.0f} s: killed (deadlock?)")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0 and r not in failures and r not in hung]
    if bad:
        hint = (" (-6 is SIGABRT: a gloo thread outlived the interpreter; see sharded_msam_sf/teardown.py)"
                if any(code == -6 for _, code in bad) else "")
        problems.append(f"ranks exited with non-zero codes: {bad}{hint}")
    if problems:
        raise RanksFailed("\n".join(problems))
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        raise RanksFailed(f"ranks {missing} exited without a result")
    return results
