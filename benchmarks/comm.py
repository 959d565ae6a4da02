"""Collectives and bytes per training step by engine, ours against AdamW (gloo ranks, CPU).

    python benchmarks/comm.py                         # world 2; ddp, zero1/2/3, fsdp2
    python benchmarks/comm.py --world 4 --engines zero3,fsdp2

Counts with :class:`sharded_msam_sf.testing.comm_count.CommCounter` (wraps the torch.distributed
collectives and DeepSpeed's cached references), per rank, forward+backward and the
optimizer step apart, averaged over the steps after the first. Expected: a one_pass step
of ours adds exactly one all-reduce of ``(groups + 1)`` float64 scalars (the sums of
squares of m and the non-finite flag) to what the engine does for AdamW; two_pass adds a
second forward/backward's worth of engine traffic plus the push of the ascent (DeepSpeed:
an all-gather of the bit16 weights per move) and two scalar all-reduces.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _engines as E  # noqa: E402


def _ranks(rank, world, engines, opts, width, layers, steps):
    from sharded_msam_sf.testing.comm_count import CommCounter
    out = {}
    for engine in engines:
        for opt in opts:
            with CommCounter() as cc:
                run = E.Run(engine, opt, width, layers, world, rank)
                fb, st, total = {}, {}, {}
                for k in range(steps):
                    cc.reset()
                    if opt == "ours_two_pass":
                        run.step(k)
                        if k:
                            _acc(total, cc.summary())
                        continue
                    run.forward_backward(k)
                    s1 = cc.summary()
                    cc.reset()
                    run.optimizer_step()
                    s2 = cc.summary()
                    if k:  # the first step creates the state; count the steady ones
                        _acc(fb, s1), _acc(st, s2), _acc(total, s1), _acc(total, s2)
                run.close()
            n = steps - 1
            out[f"{engine}/{opt}"] = {"fwd_bwd": _div(fb, n), "step": _div(st, n), "total": _div(total, n)}
    return out


def _acc(acc, summ):
    for k, v in summ.items():
        a = acc.setdefault(k, {"calls": 0, "bytes": 0})
        a["calls"] += v["calls"]
        a["bytes"] += v["bytes"]


def _div(d, n):
    return {k: {"calls": v["calls"] / n, "bytes": v["bytes"] / n} for k, v in d.items()}


def _fmt(d):
    return ", ".join(f"{k} {v['calls']:g}x {_b(v['bytes'])}" for k, v in sorted(d.items())) or "-"


def _b(x):
    return f"{x/2**20:.2f} MiB" if x >= 2 ** 16 else f"{x:g} B"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--engines", default="ddp,zero1,zero2,zero3,fsdp2")
    ap.add_argument("--opts", default="ours,adamw,ours_two_pass")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    engines, opts = args.engines.split(","), args.opts.split(",")
    res = E.run_ranks(_ranks, args.world, engines, opts, args.width, args.layers, args.steps)
    P = E.n_params(args.width, args.layers)
    print(f"# collectives per rank per training step (rank 0), world {args.world}, {P/1e6:.2f}M fp32 params "
          f"({4*P/2**20:.2f} MiB), mean of steps 2..{args.steps}")
    rows = []
    for engine in engines:
        a = res[0].get(f"{engine}/adamw")
        for opt in opts:
            r = res[0][f"{engine}/{opt}"]
            extra = None
            if a is not None and opt != "adamw":
                keys = set(r["total"]) | set(a["total"])
                extra = {k: {"calls": r["total"].get(k, {}).get("calls", 0) - a["total"].get(k, {}).get("calls", 0),
                             "bytes": r["total"].get(k, {}).get("bytes", 0) - a["total"].get(k, {}).get("bytes", 0)}
                         for k in keys}
                extra = {k: v for k, v in extra.items() if v["calls"] or v["bytes"]}
            rows.append(dict(engine=engine, opt=opt, **r, extra_vs_adamw=extra))
            print(f"{engine:<6} {opt:<14} fwd+bwd: {_fmt(r['fwd_bwd']) if opt != 'ours_two_pass' else '(in total)'}"
                  f" | step: {_fmt(r['step']) if opt != 'ours_two_pass' else '(in total)'}"
                  f" | extra vs adamw: {_fmt(extra) if extra is not None else '-'}")
    same_ranks = all(res[r] == res[0] for r in res)
    print(f"# all ranks identical: {same_ranks}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(world=args.world, params=P, rows=rows, per_rank=res), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
