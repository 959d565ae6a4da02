"""The flatness study: does MSAM + Schedule-Free find flatter minima?

    python benchmarks/flatness.py            # full study: N = 300 and 1500, 5 seeds (~10 min here)
    python benchmarks/flatness.py --quick    # N = 300, 2 seeds (< 1 min here), writes to runs/flatness_quick

Model and data: an MLP (64-128-128-10, ReLU) on scikit-learn's bundled digits
(1797 8×8 images, offline), a fixed stratified 80/20 split, features scaled
(pixels / 16, centred on the training mean). Cross-entropy, batch 64. The seed varies the initialization
and the batch order; the split is the same for every seed.

Optimizers (lr picked by a small probe on seed 0, 600 steps: AdamW {1e-3, 3e-3},
schedule-free {1e-3, 2e-3, 5e-3}, PSGD {1e-3, 3e-3, 1e-2}; every SF variant shares
the SF lr and warm-up):

    adamw           torch.optim.AdamW, lr 3e-3, linear warm-up 5% + cosine decay to 0
    sf_adamw        schedulefree.AdamWScheduleFree, lr 2e-3, warm-up 5%
    sam_sf          AdamWMSAMScheduleFree two_pass, ascent_beta=0 (SAM on SF), rho 0.05
    msam_sf_1p      AdamWMSAMScheduleFree one_pass (MSAM), rho 1.0 (its default)
    msam_sf_2p      AdamWMSAMScheduleFree two_pass, ascent_beta=β1, rho 0.05 (its default)
    msam_sf_1p_plus one_pass with the opposite perturbation sign — the seed note's literal
                    θ + ρ·x/||x|| (an ablation: a subclass, SeedSignMSAM, not an option)
    psgd_kron       heavyball.PSGDKron, lr 3e-3, warm-up 5% + cosine decay (no torch.compile)

Budgets: ``steps`` — every optimizer takes N steps (two-pass ones use 2N gradients);
``grads`` — every optimizer uses N gradient evaluations (two-pass ones take N/2
steps). One-gradient optimizers are the same run under both budgets.

Measured at the evaluation weights (schedule-free x, ``optimizer.eval()``) and in
``model.eval()``: train/test cross-entropy and accuracy, the top Hessian eigenvalue
of the training loss (power iteration), SAM sharpness of the training loss at
ρ = 0.05, and the training loss along a filter-normalized random direction (1-D,
and 2-D for seed 0) with its rise at α = ±0.5 (a width measure that, unlike the
Hessian, is not forced to 0 by a vanishing training loss). Mean ± std (sample std) over seeds.

Output (``--out``): results.json, table.md, landscape_1d.png, landscape_2d.png,
sharpness_vs_test_loss.png, hessian_convergence.png. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sharded_msam_sf import AdamWMSAMScheduleFree
from sharded_msam_sf.analysis import (
    evaluation_weights,
    loss_landscape_1d,
    loss_landscape_2d,
    sam_sharpness,
    top_hessian_eigenvalue,
)

OPTIMIZERS = ["adamw", "sf_adamw", "sam_sf", "msam_sf_1p", "msam_sf_2p", "msam_sf_1p_plus", "psgd_kron"]
TWO_PASS = {"sam_sf", "msam_sf_2p"}
LABELS = {
    "adamw": "AdamW (cosine)",
    "sf_adamw": "Schedule-Free AdamW",
    "sam_sf": "SAM + SF (two_pass, β_m=0)",
    "msam_sf_1p": "MSAM + SF one_pass",
    "msam_sf_2p": "MSAM + SF two_pass",
    "msam_sf_1p_plus": "one_pass, seed's sign (+ρ·m/|m|)",
    "psgd_kron": "PSGD-Kron (heavyball)",
}
LR_ADAM, LR_SF, LR_PSGD = 3e-3, 2e-3, 3e-3
WARMUP_FRAC = 0.05
BATCH = 64
SHARPNESS_RHO = 0.05
RISE_AT = 0.5  # landscape_rise = mean of L(θ ± 0.5·d) − L(θ) along the 1-D direction


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data and model
def load_digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean = x_tr.mean(0)
    f = lambda a: torch.tensor((a - mean) / 16.0, dtype=torch.float32)  # noqa: E731  (pixels are 0..16)
    return f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def ce_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def equal_batches(x, y, n):
    """Split (x, y) into n batches of equal size (the analysis weighs batches equally)."""
    size = len(x) // n
    return [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(n)]


def batch_stream(n_train: int, seed: int):
    g = torch.Generator().manual_seed(10_000 + seed)
    while True:
        perm = torch.randperm(n_train, generator=g)
        for i in range(0, n_train - BATCH + 1, BATCH):
            yield perm[i:i + BATCH]


# ---------------------------------------------------------------- optimizers
def warmup_cosine(total: int):
    warm = max(1, int(WARMUP_FRAC * total))

    def f(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return f


class SeedSignMSAM(AdamWMSAMScheduleFree):
    """The ablation: one_pass with the seed note's literal sign, ``θ + ρ·m/||m||`` (MSAM and
    this package use ``−ρ·m/||m||``; see ALGORITHM.md). Not an option of the optimizer."""

    def _ascent_scale(self, group, norm):
        return -super()._ascent_scale(group, norm)


def make_optimizer(name: str, model: nn.Module, steps: int):
    """(optimizer, lr scheduler or None)."""
    params = list(model.parameters())
    warm = max(1, int(WARMUP_FRAC * steps))
    if name == "adamw":
        opt = torch.optim.AdamW(params, lr=LR_ADAM, weight_decay=0.0)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    if name == "psgd_kron":
        import heavyball
        import heavyball.utils

        heavyball.utils.compile_mode = None  # torch.compile on 2 CPU cores costs minutes
        warnings.filterwarnings("ignore", message="Learning rate changed between steps")
        opt = heavyball.PSGDKron(params, lr=LR_PSGD, weight_decay=0.0)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    if name == "sf_adamw":
        import schedulefree

        return schedulefree.AdamWScheduleFree(params, lr=LR_SF, warmup_steps=warm, weight_decay=0.0), None
    kw = dict(lr=LR_SF, warmup_steps=warm, weight_decay=0.0)
    if name == "sam_sf":
        opt = AdamWMSAMScheduleFree(params, sam_mode="two_pass", ascent_beta=0.0, **kw)
    elif name == "msam_sf_2p":
        opt = AdamWMSAMScheduleFree(params, sam_mode="two_pass", **kw)
    elif name == "msam_sf_1p":
        opt = AdamWMSAMScheduleFree(params, sam_mode="one_pass", **kw)
    elif name == "msam_sf_1p_plus":
        opt = SeedSignMSAM(params, sam_mode="one_pass", **kw)
    else:
        raise ValueError(f"optimizer: unknown name {name!r}, expected one of {OPTIMIZERS}")
    return opt, None


def train(name: str, seed: int, steps: int, data):
    x_tr, y_tr, _, _ = data
    model = make_model(seed)
    opt, sched = make_optimizer(name, model, steps)
    if hasattr(opt, "train"):
        opt.train()
    model.train()
    stream = batch_stream(len(x_tr), seed)
    grads = 0
    for _ in range(steps):
        idx = next(stream)
        batch = (x_tr[idx], y_tr[idx])
        ce_loss(model, batch).backward()
        grads += 1
        if name in TWO_PASS:
            opt.move_to_ascent()
            ce_loss(model, batch).backward()
            grads += 1
            opt.move_from_ascent()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
    return model, opt, grads


# ---------------------------------------------------------------- measurement
@torch.no_grad()
def ce_and_acc(model, x, y):
    model.eval()
    out = model(x)
    model.train()
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def measure(model, opt, data, cfg, with_2d: bool):
    x_tr, y_tr, x_te, y_te = data
    train_batches = equal_batches(x_tr, y_tr, cfg.loss_batches)
    with evaluation_weights(opt):
        tr_ce, tr_acc = ce_and_acc(model, x_tr, y_tr)
        te_ce, te_acc = ce_and_acc(model, x_te, y_te)
        hess = top_hessian_eigenvalue(model, ce_loss, train_batches, iters=cfg.hessian_iters, tol=1e-3, seed=0)
        sharp = sam_sharpness(model, ce_loss, train_batches, rho=SHARPNESS_RHO)
        alphas = np.linspace(-1, 1, cfg.points_1d).tolist()
        l1 = loss_landscape_1d(model, ce_loss, train_batches, alphas=alphas, seed=123)
        l2 = None
        if with_2d:
            grid = np.linspace(-1, 1, cfg.points_2d).tolist()
            l2 = loss_landscape_2d(model, ce_loss, train_batches, alphas=grid, betas=grid, seed=123)
    a, ls = np.array(l1.alphas), np.array(l1.losses)
    rise = 0.5 * (np.interp(-RISE_AT, a, ls) + np.interp(RISE_AT, a, ls)) - float(np.interp(0.0, a, ls))
    rec = dict(train_ce=tr_ce, train_acc=tr_acc, test_ce=te_ce, test_acc=te_acc,
               hessian_top=hess.eigenvalue, hessian_converged=hess.converged,
               hessian_iterations=hess.iterations, hessian_history=hess.history,
               hessian_residual=hess.residual, sam_sharpness=sharp.sharpness, landscape_rise=rise,
               landscape_1d=dict(alphas=l1.alphas, losses=l1.losses))
    if l2 is not None:
        rec["landscape_2d"] = dict(alphas=l2.alphas, betas=l2.betas, losses=l2.losses)
    return rec


# ---------------------------------------------------------------- study
METRICS = ["train_ce", "test_ce", "train_acc", "test_acc", "hessian_top", "sam_sharpness", "landscape_rise"]


def runs_plan(budgets_n):
    """(N, optimizer, steps, budgets it belongs to) for every N."""
    plan = []
    for n in budgets_n:
        for name in OPTIMIZERS:
            if name in TWO_PASS:
                plan.append((n, name, n, ["steps"]))
                plan.append((n, name, n // 2, ["grads"]))
            else:
                plan.append((n, name, n, ["steps", "grads"]))
    return plan


def summarize(records):
    rows = []
    for n, budget in [(n, b) for n in sorted({r["N"] for r in records}) for b in ("grads", "steps")]:
        for name in OPTIMIZERS:
            rs = [r for r in records if r["optimizer"] == name and budget in r["budgets"] and r["N"] == n]
            if not rs:
                continue
            row = dict(N=n, optimizer=name, budget=budget, steps=rs[0]["steps"], grad_evals=rs[0]["grad_evals"],
                       seeds=len(rs), hessian_all_converged=all(r["hessian_converged"] for r in rs))
            for m in METRICS:
                vals = [r[m] for r in rs]
                row[m] = dict(mean=statistics.fmean(vals), std=statistics.stdev(vals) if len(vals) > 1 else 0.0)
            rows.append(row)
    return rows


def fmt(stat, digits=3, pct=False):
    if pct:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
    return f"{stat['mean']:.{digits}g} ± {stat['std']:.{digits}g}"


def markdown_table(rows, cfg, wall):
    head = ("| N | budget | optimizer | steps | grad evals | train CE | test CE | train acc % | test acc % "
            "| top Hessian eig. | SAM sharpness (ρ=0.05) | 1-D rise at α=±0.5 |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        conv = "" if r["hessian_all_converged"] else " †"
        lines.append(
            f"| {r['N']} | {r['budget']} | {LABELS[r['optimizer']]} | {r['steps']} | {r['grad_evals']} | {fmt(r['train_ce'])} "
            f"| {fmt(r['test_ce'])} | {fmt(r['train_acc'], pct=True)} | {fmt(r['test_acc'], pct=True)} "
            f"| {fmt(r['hessian_top'])}{conv} | {fmt(r['sam_sharpness'])} | {fmt(r['landscape_rise'])} |")
    note = (f"\nMLP 64-128-128-10 on sklearn digits (1437 train / 360 test), batch {BATCH}, "
            f"{cfg.seeds} seeds (mean ± sample std), N = {'/'.join(map(str, cfg.steps))} gradient evaluations / steps. "
            f"Measured at the evaluation weights (schedule-free x). "
            f"1-D rise = mean of L(θ ± 0.5·d) − L(θ), d filter-normalized (train loss). "
            f"† = power iteration did not reach tol 1e-3 in {cfg.hessian_iters} iterations for some seed. "
            f"Wall time {wall / 60:.1f} min on {cfg.threads} thread(s).\n")
    return head + "\n".join(lines) + "\n" + note


# ---------------------------------------------------------------- plots
def plots(all_records, rows, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(OPTIMIZERS, plt.get_cmap("tab10").colors))
    n_max = max(r["N"] for r in all_records)
    records = [r for r in all_records if r["N"] == n_max]  # the landscape plots show the longest runs

    # 1-D landscape, mean over seeds, one panel per budget
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, budget in zip(axes, ("grads", "steps")):
        for name in OPTIMIZERS:
            rs = [r for r in records if r["optimizer"] == name and budget in r["budgets"]]
            if not rs:
                continue
            a = rs[0]["landscape_1d"]["alphas"]
            ls = np.array([r["landscape_1d"]["losses"] for r in rs])
            ax.plot(a, ls.mean(0), label=LABELS[name], color=colors[name],
                    ls="--" if name == "msam_sf_1p_plus" else "-")
        ax.set_yscale("log")
        ax.set_xlabel("α (filter-normalized random direction)")
        ax.set_title(f"train loss along a random direction — equal {budget}, N = {n_max}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("train cross-entropy (mean over seeds)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "landscape_1d.png", dpi=110)
    plt.close(fig)

    # 2-D landscape, seed 0, equal-gradient budget
    rs2 = [r for r in records if "landscape_2d" in r and "grads" in r["budgets"]]
    if rs2:
        n = len(rs2)
        cols = 4
        fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4 * cols, 3.6 * math.ceil(n / cols)))
        axes = np.atleast_1d(axes).ravel()
        levels = np.logspace(-3, 1.5, 19)
        for ax, r in zip(axes, rs2):
            l2 = r["landscape_2d"]
            z = np.clip(np.array(l2["losses"]), levels[0], levels[-1])
            cs = ax.contour(l2["betas"], l2["alphas"], z, levels=levels, norm=matplotlib.colors.LogNorm(),
                            cmap="viridis")
            ax.set_title(LABELS[r["optimizer"]], fontsize=9)
            ax.set_aspect("equal")
        for ax in axes[n:]:
            ax.axis("off")
        fig.colorbar(cs, ax=axes.tolist(), shrink=0.6, label="train cross-entropy")
        fig.suptitle(f"train loss on a filter-normalized 2-D slice (seed 0, equal gradient evaluations, N = {n_max})")
        fig.savefig(out / "landscape_2d.png", dpi=100)
        plt.close(fig)

    # sharpness vs test loss, every run
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for ax, metric, title in ((axes[0], "hessian_top", "top Hessian eigenvalue"),
                              (axes[1], "sam_sharpness", f"SAM sharpness (ρ={SHARPNESS_RHO})"),
                              (axes[2], "landscape_rise", f"1-D landscape rise at α=±{RISE_AT}")):
        for name in OPTIMIZERS:
            for budget, marker in (("grads", "o"), ("steps", "^")):
                rs = [r for r in all_records if r["optimizer"] == name and budget in r["budgets"]]
                if budget == "steps" and name not in TWO_PASS:
                    continue  # same runs as the grads budget
                ax.scatter([r[metric] for r in rs], [r["test_ce"] for r in rs], color=colors[name], marker=marker,
                           label=f"{LABELS[name]}" + (" (equal steps)" if budget == "steps" else ""), alpha=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(title + " (train loss, at x)")
        ax.set_ylabel("test cross-entropy")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sharpness_vs_test_loss.png", dpi=110)
    plt.close(fig)

    # power-iteration convergence, seed 0
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in records:
        if r["seed"] != 0 or "grads" not in r["budgets"]:
            continue
        ax.plot(range(1, len(r["hessian_history"]) + 1), r["hessian_history"], marker=".",
                color=colors[r["optimizer"]], label=LABELS[r["optimizer"]])
    ax.set_yscale("log")
    ax.set_xlabel("Hessian-vector products")
    ax.set_ylabel("Rayleigh quotient λ_k")
    ax.set_title(f"power iteration convergence (seed 0, equal grads, N = {n_max})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "hessian_convergence.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, N = 300, coarse grids (< 3 min)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; quick 2)")
    p.add_argument("--steps", default=None,
                   help="N: steps / gradient evaluations, comma-separated for several (default 300,1500; quick 300)")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset of " + ",".join(OPTIMIZERS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the machine is shared)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/flatness; quick: runs/flatness_quick)")
    a = p.parse_args(argv)
    a.seeds = a.seeds if a.seeds is not None else (2 if a.quick else 5)
    try:
        a.steps = [int(v) for v in (a.steps or ("300" if a.quick else "300,1500")).split(",") if v.strip()]
    except ValueError:
        p.error(f"--steps must be comma-separated integers, got {a.steps!r}")
    if not a.steps or min(a.steps) < 2:
        p.error("--steps: every N must be >= 2")
    a.hessian_iters = 20 if a.quick else 50
    a.points_1d = 21 if a.quick else 41
    a.points_2d = 11 if a.quick else 25
    a.loss_batches = 3  # 1437 = 3 × 479
    root = Path(__file__).resolve().parent.parent
    a.out = Path(a.out) if a.out else root / ("runs/flatness_quick" if a.quick else "benchmarks/results/flatness")
    names = [s.strip() for s in a.optimizers.split(",") if s.strip()]
    bad = [s for s in names if s not in OPTIMIZERS]
    if bad:
        p.error(f"--optimizers: unknown {bad}, expected names from {OPTIMIZERS}")
    a.optimizers = names
    for k in ("seeds", "threads"):
        if getattr(a, k) < 1:
            p.error(f"--{k} must be >= 1")
    return a


def main(argv=None):
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    global OPTIMIZERS
    OPTIMIZERS = [n for n in OPTIMIZERS if n in cfg.optimizers]
    cfg.out.mkdir(parents=True, exist_ok=True)
    data = load_digits_split()
    plan = runs_plan(cfg.steps)
    total = len(plan) * cfg.seeds
    log(f"[flatness] {total} runs ({len(plan)} per seed × {cfg.seeds} seeds), N in {cfg.steps}, out = {cfg.out}")
    t0 = time.time()
    records = []
    k = 0
    for seed in range(cfg.seeds):
        for n_budget, name, steps, budgets in plan:
            k += 1
            t = time.time()
            model, opt, grads = train(name, seed, steps, data)
            t_train = time.time() - t
            rec = measure(model, opt, data, cfg, with_2d=(seed == 0 and n_budget == max(cfg.steps)))
            rec.update(N=n_budget, optimizer=name, seed=seed, steps=steps, grad_evals=grads, budgets=budgets,
                       train_seconds=t_train, measure_seconds=time.time() - t - t_train)
            records.append(rec)
            log(f"[flatness] {k:3d}/{total} seed {seed} {name:16s} steps {steps:5d}  train CE {rec['train_ce']:.4f} "
                f"test CE {rec['test_ce']:.4f} acc {100 * rec['test_acc']:.1f}%  λmax {rec['hessian_top']:.3g}"
                f"{'' if rec['hessian_converged'] else '(nc)'}  sharp {rec['sam_sharpness']:.3g}  "
                f"[{t_train:.1f}s + {rec['measure_seconds']:.1f}s, total {(time.time() - t0) / 60:.1f} min]")
    wall = time.time() - t0
    rows = summarize(records)
    table = markdown_table(rows, cfg, wall)
    meta = dict(command=" ".join(["python", "benchmarks/flatness.py"] + (sys.argv[1:] if argv is None else argv)),
                seeds=cfg.seeds, steps=cfg.steps, batch=BATCH, hessian_iters=cfg.hessian_iters,
                points_1d=cfg.points_1d, points_2d=cfg.points_2d, sharpness_rho=SHARPNESS_RHO,
                lr=dict(adamw=LR_ADAM, schedule_free=LR_SF, psgd=LR_PSGD), warmup_frac=WARMUP_FRAC,
                wall_seconds=wall, threads=cfg.threads, torch=torch.__version__, python=platform.python_version(),
                cpus=os.cpu_count())
    (cfg.out / "results.json").write_text(json.dumps(dict(meta=meta, summary=rows, runs=records), indent=1))
    (cfg.out / "table.md").write_text(table)
    plots(records, rows, cfg.out)
    print(table)
    log(f"[flatness] done in {wall / 60:.1f} min; wrote {cfg.out}")


if __name__ == "__main__":
    main()
