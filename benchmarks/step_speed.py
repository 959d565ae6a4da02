"""Optimizer step time on the same parameters, interleaved in one process.

    python benchmarks/step_speed.py                      # 25M fp32 params, 2 threads, CPU
    python benchmarks/step_speed.py --params 250e6 --reps 5 --only adamw_fused,ours_fused,ours_bf16,schedulefree
    python benchmarks/step_speed.py --device cuda --params 1e9   # (gpu_check.sh does this)

Every optimizer steps the same parameter shapes (a transformer-like list: square
matrices plus vectors) with a fixed gradient; one round times one step of each
optimizer in a shuffled order, and the table reports the median over the rounds, the
ratio to ``torch.optim.AdamW(fused=True)`` in the same run, the effective bandwidth
(the bytes the algorithm must move per parameter / the step time) and its share of
the machine's copy bandwidth (``dst.copy_(src)`` on 4·P bytes, measured in the same
run). Wall-clock noise on a shared machine hits every optimizer alike; the ratios
are the numbers to compare.

Rows (``--only`` picks a subset):

=================  ==========================================================  ==========
name               what                                                        bytes/param
=================  ==========================================================  ==========
ours_fused         AdamWMSAMScheduleFree, default (fused), one_pass step       44 (36 update + 8 stats)
ours_inductor      same, with SHARDED_MSAM_SF_TRITON=0 (CUDA: Inductor kernels) 44
ours_foreach       same, foreach=True                                           44
ours_single        same, foreach=False (single-tensor)                          44
ours_two_pass      fused, move_to_ascent + move_from_ascent + step (no fwd/bwd) -
ours_bf16          fused, state_dtype=torch.bfloat16                            30
adamw_fused        torch.optim.AdamW(fused=True)                                28
adamw_foreach      torch.optim.AdamW(foreach=True)                              28
schedulefree       schedulefree.AdamWScheduleFree (foreach)                     28
heavyball_msam     heavyball.MSAMLaProp                                         36
=================  ==========================================================  ==========
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings

import torch

BYTES = {"ours_inductor": 44, "ours_fused": 44, "ours_foreach": 44, "ours_single": 44, "ours_bf16": 30, "adamw_fused": 28,
         "adamw_foreach": 28, "schedulefree": 28, "heavyball_msam": 36, "ours_two_pass": None}
DEFAULT = ["adamw_fused", "adamw_foreach", "ours_fused", "ours_foreach", "ours_single", "ours_two_pass",
           "ours_bf16", "schedulefree", "heavyball_msam"]


def shapes(total: int, width: int):
    """Square ``width×width`` matrices and ``width`` vectors (two per matrix) up to ``total`` elements."""
    out, n = [], 0
    while n + width * width + 2 * width <= total:
        out += [(width, width), (width,), (width,)]
        n += width * width + 2 * width
    if total - n > 0:
        out.append((total - n,))
    return out


def make(name: str, params):
    from sharded_msam_sf import AdamWMSAMScheduleFree
    if name == "ours_fused":
        return AdamWMSAMScheduleFree(params, weight_decay=0.01)
    if name == "ours_inductor":  # CUDA: the torch.compile kernels instead of the hand-written Triton ones
        return AdamWMSAMScheduleFree(params, weight_decay=0.01)
    if name == "ours_foreach":
        return AdamWMSAMScheduleFree(params, weight_decay=0.01, foreach=True)
    if name == "ours_single":
        return AdamWMSAMScheduleFree(params, weight_decay=0.01, foreach=False)
    if name == "ours_two_pass":
        return AdamWMSAMScheduleFree(params, weight_decay=0.01, sam_mode="two_pass")
    if name == "ours_bf16":
        return AdamWMSAMScheduleFree(params, weight_decay=0.01, state_dtype=torch.bfloat16)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    if name == "adamw_foreach":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True)
    if name == "schedulefree":
        import schedulefree
        return schedulefree.AdamWScheduleFree(params, lr=0.0025, weight_decay=0.01, foreach=True)
    if name == "heavyball_msam":
        import heavyball
        return heavyball.MSAMLaProp(params, lr=0.0025, weight_decay=0.01)
    raise ValueError(name)


def one_step(name: str, opt, params, grads):
    """The optimizer's share of one training step (grads are set, no forward/backward)."""
    for p, g in zip(params, grads):
        p.grad = g
    if name == "ours_inductor":
        os.environ["SHARDED_MSAM_SF_TRITON"] = "0"
        try:
            opt.step()
        finally:
            os.environ.pop("SHARDED_MSAM_SF_TRITON", None)
        return
    if name == "ours_two_pass":
        opt.move_to_ascent()          # folds the grad into m and clears the grads
        for p, g in zip(params, grads):
            p.grad = g
        opt.move_from_ascent()
    opt.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(n: int, device, reps: int) -> float:
    """Median GB/s of ``dst.copy_(src)`` over ``n`` fp32 elements (reads + writes)."""
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 8 * n / statistics.median(times) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=25e6, help="number of fp32 parameters (default 25e6)")
    ap.add_argument("--width", type=int, default=None, help="matrix side (default: ~P/24 per matrix)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15, help="timed rounds (after --warmup rounds)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(DEFAULT))
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    total = int(args.params)
    width = args.width or max(64, int((total / 24) ** 0.5))
    shp = shapes(total, width)
    names = args.only.split(",") if args.only else list(DEFAULT)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).mul_(0.02).to(device) for s in shp]
    grads = [torch.randn(s, generator=gen).mul_(1e-3).to(device) for s in shp]
    params, opts = {}, {}
    for n in list(names):
        params[n] = [torch.nn.Parameter(t.clone()) for t in init]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opts[n] = make(n, params[n])
                if hasattr(opts[n], "train"):
                    opts[n].train()
        except Exception as e:  # e.g. heavyball not installed
            print(f"skip {n}: {type(e).__name__}: {e}", file=sys.stderr)
            names.remove(n)
            params.pop(n)
    del init

    compile_s = {}
    for n in list(names):  # warm-up: the first step compiles (ours, heavyball)
        try:
            t = time.perf_counter()
            one_step(n, opts[n], params[n], grads)
            sync(device)
            compile_s[n] = time.perf_counter() - t
            for _ in range(args.warmup - 1):
                one_step(n, opts[n], params[n], grads)
        except Exception as e:
            print(f"skip {n}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            names.remove(n)
            opts.pop(n), params.pop(n)
    bw = copy_bandwidth(total, device, 5)
    times = {n: [] for n in names}
    bws = [bw]
    rng = random.Random(0)
    for r in range(args.reps):
        order = list(names)
        rng.shuffle(order)
        for n in order:
            sync(device)
            t = time.perf_counter()
            one_step(n, opts[n], params[n], grads)
            sync(device)
            times[n].append(time.perf_counter() - t)
        if r % 5 == 4:
            bws.append(copy_bandwidth(total, device, 3))
    bw = statistics.median(bws)
    ref = statistics.median(times["adamw_fused"]) if "adamw_fused" in times else None
    ref_min = min(times["adamw_fused"]) if "adamw_fused" in times else None
    rows = []
    for n in names:
        med = statistics.median(times[n])
        b = BYTES.get(n)
        gbs = b * total / med / 1e9 if b else None
        rows.append(dict(name=n, median_ms=med * 1e3, min_ms=min(times[n]) * 1e3,
                         ratio_to_adamw_fused=med / ref if ref else None,
                         min_ratio_to_adamw_fused=min(times[n]) / ref_min if ref_min else None, bytes_per_param=b,
                         gb_per_s=gbs, share_of_copy_bw=gbs / bw if gbs else None,
                         first_step_s=compile_s[n]))
    meta = dict(params=total, tensors=len(shp), width=width, threads=args.threads, device=str(device),
                reps=args.reps, copy_gb_per_s=bw, torch=torch.__version__, python=platform.python_version(),
                cpu=platform.processor() or platform.machine(), nproc=os.cpu_count(),
                floor_ratio_ours_vs_adamw=44 / 28)
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    print(f"# {total/1e6:.0f}M fp32 params in {len(shp)} tensors, {args.threads} threads, {device}, "
          f"{args.reps} interleaved rounds; copy bandwidth {bw:.1f} GB/s")
    print(f"{'optimizer':<16}{'median ms':>11}{'x adamw_fused':>15}{'min ms':>9}{'x (min)':>9}{'B/param':>9}"
          f"{'GB/s':>8}{'of copy':>9}{'1st step s':>12}")
    for r in rows:
        fmt = lambda v, f: (f % v) if v is not None else "-"  # noqa: E731
        print(f"{r['name']:<16}{r['median_ms']:>11.1f}{fmt(r['ratio_to_adamw_fused'], '%.2f'):>15}"
              f"{r['min_ms']:>9.1f}{fmt(r['min_ratio_to_adamw_fused'], '%.2f'):>9}"
              f"{fmt(r['bytes_per_param'], '%d'):>9}{fmt(r['gb_per_s'], '%.1f'):>8}"
              f"{fmt(r['share_of_copy_bw'], '%.2f'):>9}{r['first_step_s']:>12.1f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, times_ms={n: [t * 1e3 for t in v] for n, v in times.items()}),
                      f, indent=1)
    return rows, meta


if __name__ == "__main__":
    main()
