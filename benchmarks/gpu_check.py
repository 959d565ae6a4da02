"""One-shot CUDA check: correctness of every path against the reference, then step time
at 1B params against fused AdamW and the HBM bandwidth share. Run through
``benchmarks/gpu_check.sh`` (a few minutes on one GPU); paste its output into the README.

    bash benchmarks/gpu_check.sh                 # 1B params
    bash benchmarks/gpu_check.sh --params 3e8    # a smaller GPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def correctness(device: torch.device) -> dict:
    """fused (Inductor → Triton), foreach and single-tensor on CUDA against the x/y/z reference
    on the CPU (fp32), one_pass and two_pass, two groups, warm-up, weight decay, a param
    without grads every third step, a NaN step; and bf16 state fused vs foreach."""
    from sharded_msam_sf import AdamWMSAMScheduleFree, AdamWMSAMScheduleFreeReference
    from sharded_msam_sf import kernels as K

    hp = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, warmup_steps=10, r=0.5, weight_lr_power=2.0)

    def model_on(dev):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 32)).to(dev)

    def groups(m, wd=0.1):
        return [{"params": [p for p in m.parameters() if p.ndim >= 2], "weight_decay": wd},
                {"params": [p for p in m.parameters() if p.ndim < 2], "weight_decay": 0.0}]

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 64, generator=gen), torch.randn(128, 32, generator=gen)

    def run(make, dev, mode, steps=30, nan_at=12):
        m = model_on(dev)
        xd, yd = x.to(dev), y.to(dev)
        opt = make(groups(m))
        opt.train()
        loss = lambda: ((m(xd) - yd) ** 2).mean()  # noqa: E731
        for i in range(steps):
            loss().backward()
            if mode == "two_pass":
                opt.move_to_ascent()
                loss().backward()
                opt.move_from_ascent()
            if i % 3 == 2:
                m[0].bias.grad = None
            if i == nan_at:
                m[2].weight.grad[0, 0] = float("nan")
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
            opt.zero_grad()
        opt.eval()
        return torch.cat([p.detach().reshape(-1).float().cpu() for p in m.parameters()])

    out = {}
    for mode in ("one_pass", "two_pass"):
        ref = run(lambda g: AdamWMSAMScheduleFreeReference(g, sam_mode=mode, **hp), torch.device("cpu"), mode)
        calls, tri0 = K.compile_counters()["calls"], K.compile_counters()["triton_calls"]
        t = time.perf_counter()
        fused = run(lambda g: AdamWMSAMScheduleFree(g, sam_mode=mode, fused=True, **hp), device, mode)
        first = time.perf_counter() - t
        used = K.compile_counters()["calls"] - calls
        tri_calls = K.compile_counters()["triton_calls"] - tri0   # > 0 where Triton is installed (CUDA)
        os.environ["SHARDED_MSAM_SF_TRITON"] = "0"   # the Inductor (torch.compile → Triton) kernels
        try:
            inductor = run(lambda g: AdamWMSAMScheduleFree(g, sam_mode=mode, fused=True, **hp), device, mode)
        finally:
            os.environ.pop("SHARDED_MSAM_SF_TRITON", None)
        fe = run(lambda g: AdamWMSAMScheduleFree(g, sam_mode=mode, foreach=True, **hp), device, mode)
        single = run(lambda g: AdamWMSAMScheduleFree(g, sam_mode=mode, foreach=False, **hp), device, mode)
        b16f = run(lambda g: AdamWMSAMScheduleFree(g, sam_mode=mode, fused=True, state_dtype=torch.bfloat16, **hp),
                   device, mode)
        b16e = run(lambda g: AdamWMSAMScheduleFree(g, sam_mode=mode, foreach=True, state_dtype=torch.bfloat16,
                                                   **hp), device, mode)
        d = {"fused_vs_reference": (fused - ref).abs().max().item(),
             "inductor_vs_reference": (inductor - ref).abs().max().item(),
             "foreach_vs_reference": (fe - ref).abs().max().item(),
             "single_vs_reference": (single - ref).abs().max().item(),
             "fused_vs_foreach": (fused - fe).abs().max().item(),
             "bf16_state_fused_vs_foreach": (b16f - b16e).abs().max().item(),
             "bf16_state_vs_fp32_reference": (b16f - ref).abs().max().item(),
             "compiled_calls": used, "triton_calls": tri_calls, "first_run_s": first}
        d["pass"] = bool(used > 0 and d["fused_vs_reference"] <= 1e-4 and d["foreach_vs_reference"] <= 1e-4
                         and d["inductor_vs_reference"] <= 1e-4
                         and d["single_vs_reference"] <= 1e-4 and d["bf16_state_fused_vs_foreach"] <= 1e-2)
        out[mode] = d
    return out


# (arrays read, arrays written) of n fp32 elements per kernel: the bytes it must move
KERNEL_ARRAYS = {"copy": (1, 1), "adamw_fused": (4, 3), "stats": (2, 0), "update_m": (5, 4), "update": (4, 3),
                 "fold": (2, 1), "shift": (2, 1)}


def kernel_bandwidth(device: torch.device, n: int, reps: int = 20) -> dict:
    """Each kernel alone on ``n`` fp32 elements: the median time, the bytes it must move
    (:data:`KERNEL_ARRAYS`) per second, and that as a fraction of ``dst.copy_(src)``'s rate
    measured the same way (the achievable HBM bandwidth). Our kernels through
    :func:`sharded_msam_sf.kernels.compiled.call` (the hand-written Triton ones where they
    apply, else Inductor's), and again with ``SHARDED_MSAM_SF_TRITON=0`` (Inductor's)."""
    import statistics
    from sharded_msam_sf.kernels import FusedState, compiled as C
    from sharded_msam_sf.kernels.scalars import pack, step_scalars

    def timed(fn):
        fn()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        times = []
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    gen = torch.Generator(device=device).manual_seed(0)
    p, g, z, m = (torch.randn(n, device=device, generator=gen) * 1e-2 for _ in range(4))
    v = torch.rand(n, device=device, generator=gen) * 1e-4
    sc = pack(device, **step_scalars(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, ckp1=0.5,
                                     bias_correction2=0.5, beta_m=0.9, remove_scale=1e-3, apply_scale=1e-3))
    st = FusedState()
    dst = torch.empty_like(p)
    P = torch.nn.Parameter(p.clone())
    P.grad = g
    adamw = torch.optim.AdamW([P], lr=1e-4, fused=True)
    fns = {"copy": lambda: dst.copy_(p), "adamw_fused": adamw.step,
           "stats": lambda: C.call(st, "fused", "stats", m, g, sc),
           "update_m": lambda: C.call(st, "fused", "update_m", p, g, z, v, m, sc, 7),
           "update": lambda: C.call(st, "fused", "update", p, g, z, v, sc, 7),
           "fold": lambda: C.call(st, "fused", "fold", m, g, sc, 7),
           "shift": lambda: C.call(st, "fused", "shift", p, m, sc)}
    out = {}
    for triton in ("1", "0"):
        os.environ["SHARDED_MSAM_SF_TRITON"] = triton
        try:
            for name, fn in fns.items():
                if triton == "0" and name in ("copy", "adamw_fused", "fold", "shift"):
                    continue   # (no Triton variant: measured once)
                key = name if triton == "1" else f"{name}_inductor"
                r, w = KERNEL_ARRAYS[name]
                t = timed(fn)
                out[key] = dict(ms=t * 1e3, gb_per_s=(r + w) * 4 * n / t / 1e9)
        finally:
            os.environ.pop("SHARDED_MSAM_SF_TRITON", None)
    copy = out["copy"]["gb_per_s"]
    for d in out.values():
        d["fraction_of_copy_bw"] = d["gb_per_s"] / copy
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=1e9)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--kernel-numel", type=float, default=2 ** 28, help="elements per kernel in the bandwidth table")
    ap.add_argument("--only", default="adamw_fused,adamw_foreach,ours_fused,ours_inductor,ours_bf16,ours_foreach,"
                                      "schedulefree,heavyball_msam")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    device = torch.device("cuda")
    print(f"# gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    t0 = time.perf_counter()
    corr = correctness(device)
    for mode, d in corr.items():
        print(f"correctness {mode}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in d.items()))
    torch.cuda.empty_cache()
    kb = kernel_bandwidth(device, int(args.kernel_numel))
    print(f"# each kernel alone on {int(args.kernel_numel):,} fp32 elements; HBM share = GB/s over copy_'s")
    print(f"{'kernel':<20}{'ms':>9}{'GB/s':>9}{'of copy bw':>12}")
    for name, d in kb.items():
        print(f"{name:<20}{d['ms']:>9.3f}{d['gb_per_s']:>9.0f}{d['fraction_of_copy_bw']:>12.2f}")
    torch.cuda.empty_cache()
    import step_speed
    total = int(args.params)
    free = torch.cuda.mem_get_info()[0]
    names = args.only.split(",")
    # p + g shared by nobody: each optimizer has its own params (4 B) + state; grads are shared (4 B)
    need = {"ours_inductor": 16, "adamw_fused": 12, "adamw_foreach": 12, "ours_fused": 16, "ours_bf16": 10, "ours_foreach": 16,
            "schedulefree": 12, "heavyball_msam": 16, "ours_single": 16, "ours_two_pass": 16}
    while names and total * (4 + sum(need.get(n, 16) for n in names)) * 1.15 > free:
        names.pop()  # drop the last optimizers until they fit
    rows, meta = step_speed.main(["--device", "cuda", "--params", str(total), "--reps", str(args.reps),
                                  "--only", ",".join(names), "--threads", "1",
                                  "--json", os.path.join(args.out, "step_speed_gpu.json")])
    result = dict(correctness=corr, kernels=kb, step_speed=dict(meta=meta, rows=rows), wall_s=time.perf_counter() - t0)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    ok = all(d["pass"] for d in corr.values())
    print(f"gpu_check: correctness {'PASS' if ok else 'FAIL'}; {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
