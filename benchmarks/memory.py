"""Optimizer state and peak memory per rank at world sizes 1, 2, 4 under ZeRO-1/2/3 and
FSDP2, ours against AdamW, for a fixed model (gloo ranks on the CPU).

    python benchmarks/memory.py                                  # 8 x Linear(512, 512), ~2.1M params
    python benchmarks/memory.py --worlds 1,2 --engines zero2,fsdp2 --opts ours,adamw

Per rank: the optimizer state (every tensor in the client optimizer's ``state``, local
shards), DeepSpeed's fp32 master partition where it keeps one, and the peak resident
memory added by building the engine and running the steps (``VmHWM`` after resetting it,
minus ``VmRSS`` before the model is built; a CPU stand-in for ``max_memory_allocated``;
every configuration runs once unmeasured first, so imports, DeepSpeed's op builds and
kernel compiles stay out of it; ``MALLOC_MMAP_THRESHOLD_=65536`` makes freed tensors leave
the resident set).
Expected: state = 12·P/N bytes for ours (z, v, m in fp32), 8·P/N for AdamW, 6·P/N for
ours with ``state_dtype=torch.bfloat16``; the table shows the ratio to that formula.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _engines as E  # noqa: E402

EXPECTED = {"ours": 12, "ours_bf16": 6, "adamw": 8}


def _proc(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _ranks(rank, world, engines, opts, width, layers, steps):
    import gc
    import torch.distributed as dist
    out = []
    for engine in engines:  # one-time costs (imports, op builds, kernel compiles) outside the measurement
        for opt in opts:
            run = E.Run(engine, opt, width, layers, world, rank)
            for k in range(2):
                run.step(k)
            run.close()
            del run
    for engine in engines:
        for opt in opts:
            gc.collect()
            dist.barrier()
            base = _proc("VmRSS")
            _reset_peak()
            run = E.Run(engine, opt, width, layers, world, rank)
            for k in range(steps):
                run.step(k)
            peak = _proc("VmHWM") - base
            out.append(dict(engine=engine, opt=opt, world=world, rank=rank, state_bytes=E.state_bytes(run.client),
                            master_bytes=E.master_bytes(run), peak_bytes=peak))
            run.close()
            del run
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--engines", default="zero1,zero2,zero3,fsdp2")
    ap.add_argument("--opts", default="ours,ours_bf16,adamw")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    P = E.n_params(args.width, args.layers)
    # large blocks straight from mmap and back to the OS on free: the resident peak then follows
    # the live tensors (glibc would otherwise reuse heap pages freed by the previous configuration)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    engines, opts = args.engines.split(","), args.opts.split(",")
    rows = []
    for world in map(int, args.worlds.split(",")):
        res = E.run_ranks(_ranks, world, engines, opts, args.width, args.layers, args.steps)
        for r in range(world):
            rows += res[r]
    print(f"# memory per rank, fixed model: {args.layers} x Linear({args.width}, {args.width}) = {P/1e6:.2f}M params "
          f"(fp32 params: {4*P/2**20:.1f} MiB); max over ranks")
    print(f"{'engine':<7}{'opt':<10}{'N':>3}{'state MiB':>11}{'vs k*P/N':>10}{'master MiB':>12}{'peak MiB':>10}"
          f"{'state vs adamw':>16}")
    table = []
    for engine in engines:
        for world in map(int, args.worlds.split(",")):
            adamw = max((x["state_bytes"] for x in rows if x["engine"] == engine and x["world"] == world
                         and x["opt"] == "adamw"), default=None)
            for opt in opts:
                sel = [x for x in rows if x["engine"] == engine and x["world"] == world and x["opt"] == opt]
                if not sel:
                    continue
                st = max(x["state_bytes"] for x in sel)
                ms = max(x["master_bytes"] for x in sel)
                pk = max(x["peak_bytes"] for x in sel)
                formula = EXPECTED[opt] * P / world
                row = dict(engine=engine, opt=opt, world=world, state_bytes=st, formula_bytes=formula,
                           state_vs_formula=st / formula, master_bytes=ms, peak_bytes=pk,
                           state_vs_adamw=st / adamw if adamw else None)
                table.append(row)
                print(f"{engine:<7}{opt:<10}{world:>3}{st/2**20:>11.2f}{st/formula:>10.3f}{ms/2**20:>12.2f}"
                      f"{pk/2**20:>10.1f}{(st/adamw if adamw else float('nan')):>16.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(params=P, width=args.width, layers=args.layers, rows=table, per_rank=rows), f, indent=1)
    return table


if __name__ == "__main__":
    main()
