"""Optimizer step time on the same parameters, interleaved in one process, with the machine's state.

    python benchmarks/step_speed.py                          # 25M fp32 params as 48 tensors, 2 threads, CPU
    python benchmarks/step_speed.py --layout flat            # one flat 25M tensor (the ZeRO / offload layout)
    python benchmarks/step_speed.py --layout flat --ref ds_cpu_adam   # ZeRO-Offload: ratios to DeepSpeedCPUAdam
    python benchmarks/step_speed.py --layout small           # 2,000 tensors of 4,096 elements
    python benchmarks/step_speed.py --wait-quiet --json benchmarks/results/step_speed_48.json
    python benchmarks/step_speed.py --device cuda --params 1e9 --only adamw_fused,ours_fused   # (gpu_check.sh)

Every optimizer steps its own copy of the same parameters with the same fixed
gradients. One **round** times one step of each optimizer, in a shuffled order; the
per-round ratio ``t_ours / t_adamw_fused`` of the same round is the statistic (both
steps ran within a few hundred ms of each other, under nearly the same load). Rounds
continue until the 95% bootstrap interval of the median per-round ratio is narrower
than ``--ci`` (relative half-width) for every row, or ``--max-rounds``.

Honesty: a ratio measured on a busy machine is not a speed result (the kernels suffer
unequally from contention). The benchmark records the 1-minute load average before and
after every round and the CPU frequency state (``/sys/devices/system/cpu/cpu*/cpufreq``
or ``/proc/cpuinfo``), prints them with the table and in the JSON, and marks the run
**BUSY** when the load exceeded ``--quiet-load`` (default 0.5 + threads) at any round;
``--wait-quiet`` first waits (up to ``--wait-max`` s) for the load to fall below it.

Layouts (``--layout``; ``--params`` P, default 25e6):

- ``matrices``: 24 square ``w×w`` matrices (w ≈ sqrt(P/24), 1024 at 25M) and 24 vectors of w:
  48 tensors (the transformer-like case);
- ``flat``: one tensor of P elements (what ZeRO-1/2/3 and ZeRO-Offload hand the optimizer);
- ``small``: ``--small-count`` tensors (2,000) of ``--small-numel`` elements (4,096): per-tensor cost.

Rows (``--only`` picks a subset; default ``adamw_fused,ours_fused,ds_cpu_adam,schedulefree``):

=================  ==========================================================  ==========
name               what                                                        bytes/param
=================  ==========================================================  ==========
ours_fused         AdamWMSAMScheduleFree, default (auto), one_pass step: CPU    44 (36 update + 8 stats)
                   fp32 takes the multi-tensor C++ kernel, CUDA the Triton one
ours_compiled      same, the multi-tensor kernel off (the compiled kernels)    44
ours_inductor      same, with SHARDED_MSAM_SF_TRITON=0 (CUDA: Inductor kernels) 44
ours_foreach       same, foreach=True                                           44
ours_single        same, foreach=False (single-tensor)                          44
ours_two_pass      fused, move_to_ascent + move_from_ascent + step (no fwd/bwd) 44 + 20 + 12
ours_bf16          fused, state_dtype=torch.bfloat16                            30
adamw_fused        torch.optim.AdamW(fused=True)                                28
adamw_foreach      torch.optim.AdamW(foreach=True)                              28
ds_cpu_adam        deepspeed.ops.adam.DeepSpeedCPUAdam (built once, before     28
                   timing, by DeepSpeed's op builder; CPU only)
schedulefree       schedulefree.AdamWScheduleFree (foreach)                     28
heavyball_msam     heavyball.MSAMLaProp                                         36
=================  ==========================================================  ==========

The 44/28 = 1.57 byte floor is ours against any 28-byte AdamW step.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings

import torch

BYTES = {"ours_inductor": 44, "ours_fused": 44, "ours_compiled": 44, "ours_foreach": 44, "ours_single": 44, "ours_bf16": 30,
         "adamw_fused": 28, "adamw_foreach": 28, "ds_cpu_adam": 28, "schedulefree": 28, "heavyball_msam": 36,
         "ours_two_pass": 76}
ALL = list(BYTES)
DEFAULT = ["adamw_fused", "ours_fused", "ds_cpu_adam", "schedulefree"]
REF = "adamw_fused"


# ----------------------------------------------------------------------------- machine state
def load1() -> float:
    """The 1-minute load average (runnable + uninterruptible tasks, all users)."""
    return os.getloadavg()[0]


def cpu_freq() -> dict:
    """The CPUs' frequency state: cpufreq's governor and current/max kHz where the kernel exposes
    them, else the ``cpu MHz`` lines of /proc/cpuinfo (a VM often shows only the nominal clock)."""
    out = {}
    cur = sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"))
    if cur:
        def read(p):
            try:
                with open(p) as f:
                    return f.read().strip()
            except OSError:
                return None
        out["source"] = "cpufreq"
        out["cur_mhz"] = [int(read(p)) / 1000 for p in cur if read(p)]
        out["max_mhz"] = [int(read(p.replace("scaling_cur_freq", "cpuinfo_max_freq")) or 0) / 1000 for p in cur]
        out["governor"] = sorted({read(p.replace("scaling_cur_freq", "scaling_governor")) for p in cur} - {None})
        return out
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.lower().startswith("cpu mhz")]
        out = {"source": "/proc/cpuinfo", "cur_mhz": mhz}
    except OSError:
        out = {"source": None}
    return out


def wait_quiet(limit: float, max_s: float) -> bool:
    """Poll the load average until it is at most ``limit`` (True) or ``max_s`` passed (False)."""
    t0 = time.time()
    while load1() > limit:
        if time.time() - t0 > max_s:
            return False
        print(f"# waiting for a quiet machine: load {load1():.2f} > {limit:.2f}", file=sys.stderr, flush=True)
        time.sleep(15)
    return True


# ----------------------------------------------------------------------------- parameters
def shapes(layout: str, total: int, small_count: int = 2000, small_numel: int = 4096):
    if layout == "flat":
        return [(total,)]
    if layout == "small":
        return [(small_numel,)] * small_count
    if layout == "matrices":
        w = max(64, int(round((total / 24) ** 0.5)))
        return [(w, w)] * 24 + [(w,)] * 24
    raise ValueError(f"unknown layout {layout!r} (matrices, flat, small)")


def make(name: str, params):
    from sharded_msam_sf import AdamWMSAMScheduleFree
    if name in ("ours_fused", "ours_inductor", "ours_compiled"):
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
    if name == "ds_cpu_adam":
        if params[0].device.type != "cpu":
            raise RuntimeError("DeepSpeedCPUAdam runs on CPU tensors only")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.ops.adam import DeepSpeedCPUAdam   # the op builder JIT-compiles cpu_adam here, once
        return DeepSpeedCPUAdam(params, lr=1e-3, weight_decay=0.01, adamw_mode=True)
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
    if name == "ours_compiled":
        from sharded_msam_sf import kernels as K
        K.MULTI_TENSOR = False
        try:
            opt.step()
        finally:
            K.MULTI_TENSOR = True
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


# ----------------------------------------------------------------------------- statistics
def median_ci(xs, level: float = 0.95, resamples: int = 2000, seed: int = 0):
    """The median of ``xs`` and its percentile-bootstrap interval."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    lo = meds[int((1 - level) / 2 * resamples)]
    hi = meds[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return statistics.median(xs), lo, hi


def _ratios(times, n, ref=REF):
    return [a / b for a, b in zip(times[n], times[ref])]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layout", default="matrices", choices=("matrices", "flat", "small"))
    ap.add_argument("--params", type=float, default=25e6, help="number of fp32 parameters (matrices, flat)")
    ap.add_argument("--small-count", type=int, default=2000)
    ap.add_argument("--small-numel", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-rounds", type=int, default=9)
    ap.add_argument("--max-rounds", type=int, default=61)
    ap.add_argument("--reps", type=int, default=None, help="exactly this many rounds (no adaptive stop)")
    ap.add_argument("--ci", type=float, default=0.03,
                    help="stop when every row's 95%% interval of the median ratio is within ±this (relative)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quiet-load", type=float, default=None, help="busy above this load (default 0.5 + threads)")
    ap.add_argument("--wait-quiet", action="store_true", help="wait for load <= --quiet-load before timing")
    ap.add_argument("--wait-max", type=float, default=1800.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(ALL))
    ap.add_argument("--ref", default=REF, help="the row the ratios are to (e.g. ds_cpu_adam for ZeRO-Offload)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    ref = args.ref
    if args.reps is not None:
        args.min_rounds = args.max_rounds = args.reps

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    quiet = args.quiet_load if args.quiet_load is not None else 0.5 + args.threads
    shp = shapes(args.layout, int(args.params), args.small_count, args.small_numel)
    total = sum(int(torch.Size(s).numel()) for s in shp)
    names = args.only.split(",") if args.only else list(DEFAULT)
    if ref not in names:
        names.insert(0, ref)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).mul_(0.02).to(device) for s in shp]
    grads = [torch.randn(s, generator=gen).mul_(1e-3).to(device) for s in shp]
    params, opts, skipped = {}, {}, {}
    for n in list(names):
        params[n] = [torch.nn.Parameter(t.clone()) for t in init]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opts[n] = make(n, params[n])
                if hasattr(opts[n], "train"):
                    opts[n].train()
        except Exception as e:  # e.g. heavyball not installed, DeepSpeedCPUAdam not buildable
            skipped[n] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"skip {n}: {skipped[n]}", file=sys.stderr)
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
            skipped[n] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"skip {n}: {skipped[n]}", file=sys.stderr)
            names.remove(n)
            opts.pop(n), params.pop(n)
    if ref not in names:
        sys.exit(f"step_speed: the reference {ref} did not run ({skipped.get(ref)})")

    waited = None
    if args.wait_quiet:
        waited = wait_quiet(quiet, args.wait_max)
        if not waited:
            print(f"# still busy after {args.wait_max:.0f} s: timing anyway, the run is marked BUSY", file=sys.stderr)
    freq_before = cpu_freq()
    bws = [copy_bandwidth(total, device, 5)]
    times = {n: [] for n in names}
    loads = []
    rng = random.Random(0)
    r = 0
    while True:
        order = list(names)
        rng.shuffle(order)
        l0 = load1()
        for n in order:
            sync(device)
            t = time.perf_counter()
            one_step(n, opts[n], params[n], grads)
            sync(device)
            times[n].append(time.perf_counter() - t)
        loads.append((l0, load1()))
        r += 1
        if r % 5 == 0:
            bws.append(copy_bandwidth(total, device, 3))
        if r >= args.max_rounds:
            break
        if r >= args.min_rounds:
            widths = [(hi - lo) / 2 / med for med, lo, hi in
                      (median_ci(_ratios(times, n, ref), resamples=500) for n in names if n != ref)]
            if all(w <= args.ci for w in widths):
                break
    freq_after = cpu_freq()
    bw = statistics.median(bws)
    max_load = max(max(a, b) for a, b in loads)
    busy = max_load > quiet
    ref_min = min(times[ref])
    rows = []
    for n in names:
        med = statistics.median(times[n])
        ratio, lo, hi = median_ci(_ratios(times, n, ref))
        b = BYTES.get(n)
        gbs = b * total / med / 1e9 if b else None
        rows.append(dict(name=n, median_ms=med * 1e3, min_ms=min(times[n]) * 1e3,
                         ratio_median=ratio, ratio_ci95=[lo, hi], ratio_of_mins=min(times[n]) / ref_min,
                         bytes_per_param=b, gb_per_s=gbs, share_of_copy_bw=gbs / bw if gbs else None,
                         first_step_s=compile_s[n]))
    meta = dict(layout=args.layout, ratio_to=ref, params=total, tensors=len(shp), threads=args.threads, device=str(device),
                rounds=r, ci_target=args.ci, copy_gb_per_s=bw, torch=torch.__version__,
                python=platform.python_version(), cpu=platform.processor() or platform.machine(),
                nproc=os.cpu_count(), floor_ratio_ours_vs_adamw=44 / 28,
                load1_per_round=loads, load1_max=max_load, load1_median=statistics.median(a for a, _ in loads),
                quiet_load_limit=quiet, busy=busy, waited_for_quiet=waited,
                cpu_freq_before=freq_before, cpu_freq_after=freq_after, skipped=skipped,
                utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    mhz = freq_before.get("cur_mhz") or []
    print(f"# {total/1e6:.1f}M fp32 params in {len(shp)} tensors ({args.layout}), {args.threads} threads, {device}, "
          f"{r} interleaved rounds; ratios to {ref}; copy bandwidth {bw:.1f} GB/s")
    print(f"# load average (1 min) per round: median {meta['load1_median']:.2f}, max {max_load:.2f} "
          f"(quiet limit {quiet:.2f}); CPU MHz ({freq_before.get('source')}): "
          f"{', '.join(f'{x:.0f}' for x in mhz[:8]) or 'unknown'}")
    if busy:
        print(f"# BUSY: the load exceeded {quiet:.2f} during the run: these ratios are NOT speed results "
              "(rerun with --wait-quiet on a quiet machine)")
    print(f"{'optimizer':<15}{'median ms':>10}{'min ms':>9}{'ratio (median)':>16}{'95% CI':>16}{'ratio of mins':>15}"
          f"{'B/param':>8}{'GB/s':>7}{'of copy':>8}{'1st s':>7}")
    for row in rows:
        fmt = lambda v, f: (f % v) if v is not None else "-"  # noqa: E731
        ci = f"[{row['ratio_ci95'][0]:.2f}, {row['ratio_ci95'][1]:.2f}]"
        print(f"{row['name']:<15}{row['median_ms']:>10.1f}{row['min_ms']:>9.1f}{row['ratio_median']:>16.2f}"
              f"{ci:>16}{row['ratio_of_mins']:>15.2f}{fmt(row['bytes_per_param'], '%d'):>8}"
              f"{fmt(row['gb_per_s'], '%.1f'):>7}{fmt(row['share_of_copy_bw'], '%.2f'):>8}"
              f"{row['first_step_s']:>7.1f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, times_ms={n: [t * 1e3 for t in v] for n, v in times.items()}),
                      f, indent=1)
    return rows, meta


if __name__ == "__main__":
    main()
