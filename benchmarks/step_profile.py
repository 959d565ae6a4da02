"""Where one optimizer step's memory traffic goes, counted, not timed (independent of the load).

    python benchmarks/step_profile.py                 # the three step_speed layouts at 25M / 2,000×4K
    python benchmarks/step_profile.py --json benchmarks/results/step_profile.json

For each layout and optimizer, one step (after a warm-up step) runs under a
``TorchDispatchMode`` that sees every eager ATen op with its tensors: it counts the ops
and the bytes they touch (every tensor argument read once, every output or mutated
argument written once: the traffic of an unfused op). The compiled kernels are opaque
to the dispatcher; their calls are counted at :func:`sharded_msam_sf.kernels.compiled.call`
and charged the bytes of their generated code, which is one vectorized loop each
(``TORCH_LOGS=output_code``): stats reads m, g (8 B/element in fp32), update_m reads
p, g, z, v, m and writes p, z, v, m (36), update 28, fold 12, shift 12; the multi-tensor
C++ kernel over lists of small tensors (``kernels/multi_tensor.py``) likewise, 8 and 36.

Output per row: dispatcher ops, compiled calls, bytes per parameter, and that over
fused AdamW's (28 B/param: ``_fused_adamw_`` reads p, g, m, v and writes p, m, v). The
byte ratio is the floor the step's time ratio can reach on a bandwidth-bound machine;
per-call costs (dispatcher ops, compiled calls, Python) come on top.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_speed  # noqa: E402

KERNEL_BYTES = {"stats": (2, 0), "flag": (1, 0), "update_m": (5, 4), "update": (4, 3), "fold": (2, 1),
                "shift": (2, 1)}   # (arrays read, arrays written) of n elements


def _nbytes(t):
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) and t.device.type != "meta" else 0


class Counter(TorchDispatchMode):
    """Counts ATen ops and the bytes their tensor arguments and results span."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes, self.by_op = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        b = 0
        if not func.is_view:       # a view moves no data
            flat_in, _ = tree_flatten((args, kwargs))
            b = sum(_nbytes(t) for t in flat_in)                          # every input read once
            schema = func._schema.arguments
            for i, arg in enumerate(schema):                               # mutated arguments written once
                if arg.alias_info is not None and arg.alias_info.is_write and not (
                        arg.name == "grads" and kwargs.get("grad_scale") is None):   # fused Adam: g only read
                    val = args[i] if i < len(args) else kwargs.get(arg.name)
                    b += sum(_nbytes(t) for t in tree_flatten(val)[0])
            ptrs = {t.data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
            b += sum(_nbytes(t) for t in tree_flatten(out)[0]                # new results written once
                     if isinstance(t, torch.Tensor) and t.data_ptr() not in ptrs)
        self.ops += 1
        self.bytes += b
        name = str(func.overloadpacket.__name__)
        c = self.by_op.setdefault(name, [0, 0])
        c[0] += 1
        c[1] += b
        return out


def profile(layout, total, names, small_count, small_numel):
    from sharded_msam_sf.kernels import compiled as C, multi_tensor as MT
    shp = step_speed.shapes(layout, total, small_count, small_numel)
    n_el = sum(torch.Size(s).numel() for s in shp)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).mul_(0.02) for s in shp]
    grads = [torch.randn(s, generator=gen).mul_(1e-3) for s in shp]
    rows = []
    for name in names:
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = step_speed.make(name, params)
        if hasattr(opt, "train"):
            opt.train()
        step_speed.one_step(name, opt, params, grads)   # warm-up (compiles)
        calls = {}
        real = C.call

        def counted(state, impl, kname, *args, _real=real):
            n = args[0].numel()
            r, w = KERNEL_BYTES[kname]
            c = calls.setdefault(kname, [0, 0])
            c[0] += 1
            c[1] += (r + w) * n * 4 if args[0].dtype == torch.float32 else (r + w) * n * args[0].element_size()
            with _disable_current_modes():
                return _real(state, impl, kname, *args)
        C.call = counted
        real_stats, real_update = MT.stats, MT.update_

        def mt_stats(ms, gs, beta_m):
            c = calls.setdefault("multi_stats", [0, 0])
            c[0] += 1
            c[1] += sum(t.numel() for t in gs) * 4 * (2 if len(ms) and beta_m is not None else 1)
            with _disable_current_modes():
                return real_stats(ms, gs, beta_m)

        def mt_update(ps, gs, zs, vs, ms, sc):
            c = calls.setdefault("multi_update", [0, 0])
            c[0] += 1
            c[1] += sum(t.numel() for t in ps) * 4 * (9 if ms is not None else 7)
            with _disable_current_modes():
                return real_update(ps, gs, zs, vs, ms, sc)
        MT.stats, MT.update_ = mt_stats, mt_update
        try:
            with Counter() as cnt:
                step_speed.one_step(name, opt, params, grads)
        finally:
            C.call = real
            MT.stats, MT.update_ = real_stats, real_update
        kb = sum(b for _, b in calls.values())
        rows.append(dict(layout=layout, name=name, params=n_el, tensors=len(shp), dispatcher_ops=cnt.ops,
                         compiled_calls=sum(c for c, _ in calls.values()),
                         bytes_per_param=(cnt.bytes + kb) / n_el, eager_bytes_per_param=cnt.bytes / n_el,
                         compiled_bytes_per_param=kb / n_el,
                         top_ops=sorted(((k, v[0], v[1] / n_el) for k, v in cnt.by_op.items()),
                                        key=lambda x: -x[2])[:8],
                         kernels={k: [c, b / n_el] for k, (c, b) in calls.items()}))
    ref = next((r["bytes_per_param"] for r in rows if r["name"] == "adamw_fused"), None)
    for r in rows:
        r["bytes_vs_adamw_fused"] = r["bytes_per_param"] / ref if ref else None
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=25e6)
    ap.add_argument("--small-count", type=int, default=2000)
    ap.add_argument("--small-numel", type=int, default=4096)
    ap.add_argument("--layouts", default="matrices,flat,small")
    ap.add_argument("--only", default="adamw_fused,ours_fused,ours_foreach,ours_two_pass,schedulefree")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for layout in args.layouts.split(","):
        rows += profile(layout, int(args.params), args.only.split(","), args.small_count, args.small_numel)
    print(f"{'layout':<9}{'optimizer':<15}{'tensors':>8}{'aten ops':>9}{'compiled':>9}{'B/param':>9}"
          f"{'x adamw':>8}  heaviest eager ops (B/param)")
    for r in rows:
        top = ", ".join(f"{k}×{c}:{b:.0f}" for k, c, b in r["top_ops"][:4] if b >= 0.5)
        ratio = f"{r['bytes_vs_adamw_fused']:.2f}" if r["bytes_vs_adamw_fused"] else "-"
        print(f"{r['layout']:<9}{r['name']:<15}{r['tensors']:>8}{r['dispatcher_ops']:>9}{r['compiled_calls']:>9}"
              f"{r['bytes_per_param']:>9.1f}{ratio:>8}  {top}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
