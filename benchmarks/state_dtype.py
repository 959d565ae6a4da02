"""The effect of ``state_dtype=torch.bfloat16`` on the trajectory, measured.

    python benchmarks/state_dtype.py            # an MLP regression, 1000 steps, lr 1e-3, 3 seeds

Trains the same model from the same start on the same batches with (a) fp32 state,
(b) bf16 state with stochastic rounding (what ``state_dtype=torch.bfloat16`` does) and
(c) bf16 state with round-to-nearest (for contrast: a plain ``.to(bfloat16)`` of the
state, by disabling the random bits), one_pass with the default rho, and reports the
final train loss, the eval-mode (x) loss on held-out data, and the relative distance of
the final x weights to the fp32-state run (``||x_bf16 − x_fp32|| / ||x_fp32 − x_0||``),
plus the same distance between two fp32 runs whose data order differs in one batch
(the scale of ordinary run-to-run variation).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from sharded_msam_sf import AdamWMSAMScheduleFree
from sharded_msam_sf.kernels import bf16_state as SR

_ROUND_TO = SR.round_to


def model_and_data(seed, d=64, hidden=256, n=2048):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, d))
    torch.manual_seed(seed)
    for p in teacher.parameters():
        p.data = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
    x = torch.randn(n, d, generator=g)
    with torch.no_grad():
        y = teacher(x) + 0.1 * torch.randn(n, d, generator=g)
    torch.manual_seed(seed + 100)
    student = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
                                  torch.nn.GELU(), torch.nn.Linear(hidden, d))
    return student, x, y


def train(seed, variant, steps, perturb_batch=None, lr=1e-3):
    model, x, y = model_and_data(seed)
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    xtr, ytr, xte, yte = x[:1536], y[:1536], x[1536:], y[1536:]
    sd = None if variant == "fp32" else torch.bfloat16
    opt = AdamWMSAMScheduleFree(model.parameters(), lr=lr, weight_decay=0.01, warmup_steps=20,
                                state_dtype=sd, foreach=True)
    if variant == "bf16_nearest":  # the contrast: a plain round-to-nearest cast of the state
        SR.round_to = lambda xv, dtype, r16: xv.to(dtype)
    try:
        opt.train()
        g = torch.Generator().manual_seed(seed + 7)
        losses = []
        for k in range(steps):
            idx = torch.randint(0, 1536, (64,), generator=g)
            if perturb_batch is not None and k == perturb_batch:
                idx = torch.randint(0, 1536, (64,), generator=torch.Generator().manual_seed(999))
            loss = torch.nn.functional.mse_loss(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        opt.eval()
        with torch.no_grad():
            train_loss = torch.nn.functional.mse_loss(model(xtr), ytr).item()
            test_loss = torch.nn.functional.mse_loss(model(xte), yte).item()
        w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return dict(train_loss=train_loss, test_loss=test_loss, w=w, x0=x0, curve=losses)
    finally:
        SR.round_to = _ROUND_TO


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = {v: [] for v in ("fp32", "fp32_other_batch", "bf16_sr", "bf16_nearest")}
    for seed in range(args.seeds):
        ref = train(seed, "fp32", args.steps, lr=args.lr)
        for v in rows:
            r = ref if v == "fp32" else train(seed, "fp32" if v == "fp32_other_batch" else v, args.steps,
                                              perturb_batch=args.steps // 2 if v == "fp32_other_batch" else None,
                                              lr=args.lr)
            dist = ((r["w"] - ref["w"]).norm() / (ref["w"] - ref["x0"]).norm()).item()
            rows[v].append(dict(seed=seed, train_loss=r["train_loss"], test_loss=r["test_loss"], rel_dist_to_fp32=dist))
    print(f"# state_dtype effect: MLP regression, one_pass rho=1.0, lr {args.lr}, {args.steps} steps, {args.seeds} seeds (median)")
    print(f"{'state':<18}{'train loss':>12}{'test loss':>12}{'||x - x_fp32|| / ||x_fp32 - x0||':>34}")
    summary = {}
    for v, rs in rows.items():
        s = {k: statistics.median(r[k] for r in rs) for k in ("train_loss", "test_loss", "rel_dist_to_fp32")}
        summary[v] = s
        print(f"{v:<18}{s['train_loss']:>12.4f}{s['test_loss']:>12.4f}{s['rel_dist_to_fp32']:>34.4f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(steps=args.steps, seeds=args.seeds, summary=summary, runs=rows), f, indent=1)
    return summary


if __name__ == "__main__":
    main()
