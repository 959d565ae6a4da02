"""Run a test function on N local ranks (gloo, 127.0.0.1, a free port), every rank asserting.

``run_ranks(fn, world_size, *args, timeout=120)`` spawns ``world_size`` processes
that each call ``fn(rank, world_size, *args)`` inside an initialised gloo process
group. A rank that raises fails the test with its traceback; ranks still running
after ``timeout`` seconds are killed and the test fails (no hung CI). ``fn`` must
be importable (a module-level function of a test module).
"""
from __future__ import annotations

import os
import socket
import sys
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_ranks"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}")
        fn(rank, world_size, *args)
        dist.barrier()
    except BaseException:  # report every rank's failure, not only the first
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# torch 2.13's gloo transport occasionally aborts a rank (std::terminate, SIGABRT) on the 2-core build
# machine with no error of the test's own; such a run is repeated once, and reported on stderr.
_SIGABRT = -6


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; raise if any rank fails or hangs."""
    try:
        _run_once(fn, world_size, args, timeout)
    except _GlooAbort as e:
        print(f"run_ranks: {e}; running the ranks once more", file=sys.stderr)
        _run_once(fn, world_size, args, timeout, retry=False)


class _GlooAbort(AssertionError):
    pass


def _run_once(fn, world_size, args, timeout, retry=True) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errors), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    import time
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    aborted = [r for r, p in enumerate(procs) if p.exitcode == _SIGABRT]
    if retry and aborted:
        raise _GlooAbort(f"ranks {aborted} aborted (SIGABRT)")
    if failures:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures))
        raise AssertionError(f"{len(failures)} rank(s) failed:\n{msg}")
    if hung:
        raise AssertionError(f"ranks {hung} still running after {timeout:.0f} s: killed (deadlock?)")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks exited with non-zero codes: {bad}")
