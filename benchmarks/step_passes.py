"""Where the CPU step's time goes, pass by pass: the measured floor of our step against fused AdamW.

    python benchmarks/step_passes.py --wait-quiet                 # 25M fp32 elements, 2 threads
    python benchmarks/step_passes.py --json benchmarks/results/step_passes.json

Our one_pass step is two memory passes (ALGORITHM.md; ``kernels/multi_tensor.py``): the
**stats** pass reads m and g (8 B/element) for ``||β_m·m + (1 − β_m)·g||²`` and the NaN flag,
and, after the one all-reduce, the **update** pass reads p, g, z, v, m and writes p, z, v, m
(36 B). Fused AdamW (``torch._fused_adamw_``) is one pass of 28 B. If every pass ran at the same
bandwidth the step ratio would be 44/28 = 1.57; what a machine gives is
``(t_stats + t_update) / t_adamw`` — the **pass floor** printed here — because a read-only pass
and a pass over nine streams do not run at a 7-stream pass's bandwidth. The optimizer's own
per-step cost (Python, the stats tensor, the all-reduce call) comes on top: compare with
``step_speed.py --layout flat``.

Rows, each the median over interleaved rounds (one call of every kernel per round, shuffled),
with its GB/s: ``stats``, ``update``, ``adamw`` (fused AdamW), ``read2`` (``torch.dot(m, g)``: a
read-only pass over the same 8 B, BLAS), ``copy`` (``dst.copy_(src)``: 8 B). The machine's
load and CPU frequency are recorded as in ``step_speed.py`` (BUSY above ``--quiet-load``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_speed as S  # noqa: E402

BYTES = {"stats": 8, "update": 36, "adamw": 28, "read2": 8, "copy": 8}


def kernels(n: int):
    """The timed calls over ``n`` fp32 elements (fresh tensors, no optimizer around them)."""
    from sharded_msam_sf.kernels import multi_tensor as MT
    if MT.load() is None:
        raise SystemExit(f"the multi-tensor kernel did not build: {MT.build_error()}")
    gen = torch.Generator().manual_seed(0)
    p, g, z, m = (torch.randn(n, generator=gen) for _ in range(4))
    v = torch.rand(n, generator=gen)
    ap, ag, am = (torch.randn(n, generator=gen) for _ in range(3))
    av = torch.rand(n, generator=gen)
    step = torch.zeros(())
    # lr, coef_y, beta2, 1 - beta2, bc2, eps, wd, ckp1, beta_m, 1 - beta_m, -remove, apply (kernels.scalars)
    sc = [1e-3, -0.9, 0.999, 1e-3, 0.5, 1e-8, 0.01, 0.1, 0.9, 0.1, 0.0, 0.0]
    dst = torch.empty(n)
    return {
        "stats": lambda: MT.stats([m], [g], 0.9),
        "update": lambda: MT.update_([p], [g], [z], [v], [m], sc),
        "adamw": lambda: torch._fused_adamw_([ap], [ag], [am], [av], [], [step], amsgrad=False, lr=1e-3,
                                            beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, maximize=False),
        "read2": lambda: torch.dot(m, g),
        "copy": lambda: dst.copy_(m),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=float, default=25e6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--quiet-load", type=float, default=None, help="busy above this load (default 0.5 + threads)")
    ap.add_argument("--wait-quiet", action="store_true")
    ap.add_argument("--wait-max", type=float, default=1800.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = int(args.numel)
    quiet = args.quiet_load if args.quiet_load is not None else 0.5 + args.threads
    calls = kernels(n)
    for f in calls.values():   # warm-up (and the kernel build)
        f()
    if args.wait_quiet:
        S.wait_quiet(quiet, args.wait_max)
    times = {k: [] for k in calls}
    loads = []
    order = list(calls)
    for r in range(args.rounds):
        loads.append(S.load1())
        random.Random(r).shuffle(order)
        for k in order:
            t = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t)
    busy = max(loads) > quiet
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = [(a + b) / c for a, b, c in zip(times["stats"], times["update"], times["adamw"])]
    f_med, f_lo, f_hi = S.median_ci(floor)
    print(f"# {n / 1e6:.1f}M fp32 elements, {args.threads} threads, {args.rounds} interleaved rounds; load average "
          f"(1 min) median {statistics.median(loads):.2f}, max {max(loads):.2f} (quiet limit {quiet:.2f})"
          f"{'  BUSY: not a result' if busy else ''}; CPU MHz {S.cpu_freq().get('cur_mhz')}")
    print(f"{'pass':<8}{'B/elem':>8}{'median ms':>11}{'GB/s':>8}")
    for k in calls:
        print(f"{k:<8}{BYTES[k]:>8}{med[k] * 1e3:>11.2f}{BYTES[k] * n / med[k] / 1e9:>8.1f}")
    print(f"pass floor (stats + update) / adamw: {f_med:.3f} [{f_lo:.3f}, {f_hi:.3f}] (byte floor 44/28 = 1.571)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": {"numel": n, "threads": args.threads, "rounds": args.rounds, "load1": loads,
                                "busy": busy, "cpu": S.cpu_freq(), "torch": torch.__version__},
                       "median_s": med, "bytes_per_elem": BYTES,
                       "pass_floor": {"median": f_med, "ci95": [f_lo, f_hi]}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
