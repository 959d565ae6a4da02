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
import time
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from sharded_msam_sf.teardown import close_process_group

__all__ = ["free_port", "run_ranks"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ok = False
    try:
        import torch
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}")
        fn(rank, world_size, *args)
        dist.barrier()
        ok = True
    except BaseException:  # report every rank's failure, not only the first
        errors.put((rank, traceback.format_exc()))
    # outside the except clause: the traceback (and the frames holding the test's engines) is gone,
    # so the collection below joins every gloo thread before the interpreter finalizes
    close_process_group()
    if not ok:
        sys.exit(1)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; raise if any rank fails or hangs."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errors), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
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
    if failures:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures))
        raise AssertionError(f"{len(failures)} rank(s) failed:\n{msg}")
    if hung:
        raise AssertionError(f"ranks {hung} still running after {timeout:.0f} s: killed (deadlock?)")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        hint = (" (-6 is SIGABRT: a gloo thread outlived the interpreter; see sharded_msam_sf/teardown.py)"
                if any(code == -6 for _, code in bad) else "")
        raise AssertionError(f"ranks exited with non-zero codes: {bad}{hint}")
