"""Table and plots of benchmarks/lm_study.py from its finished runs (OUT/cells/*.json).

    python benchmarks/lm_study.py --report-only [--out DIR]

Writes OUT/summary.json (one row per budget × optimizer: mean ± sample std over the seeds),
OUT/table.md and, where matplotlib is installed, OUT/val_vs_grads.png (validation loss at x
against gradient evaluations, mean ± std band), OUT/landscape_1d.png (training loss along a
filter-normalized random direction at the final x, mean over seeds), OUT/sharpness_vs_val.png
(λmax and SAM sharpness against validation loss, every run) and OUT/hessian_convergence.png.

A difference to AdamW is called better / worse only when it is larger than the larger of the
two standard deviations; otherwise it is a tie.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

SHARP_RHO = "0.05"
METRICS = ("val_loss_x", "val_ppl_x", "val_loss_y", "train_loss_grad_point", "train_loss_x", "gap",
           "hessian_top", "sharpness", "landscape_rise", "train_seconds")


def _load(out: Path):
    recs = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    tuning = json.loads((out / "tuning.json").read_text()) if (out / "tuning.json").is_file() else {}
    return recs, meta, tuning


def _stat(vals):
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return None
    return dict(mean=statistics.fmean(vals), std=statistics.stdev(vals) if len(vals) > 1 else 0.0, n=len(vals))


def _cell_values(c: dict) -> dict:
    v = dict(val_loss_x=c["val_loss_x"], val_ppl_x=c["val_ppl_x"], val_loss_y=c.get("val_loss_y"),
             train_loss_grad_point=c["train_loss_grad_point"], train_loss_x=c.get("train_loss_x"),
             hessian_top=c.get("hessian_top"), landscape_rise=c.get("landscape_rise"),
             sharpness=(c.get("sam_sharpness") or {}).get(SHARP_RHO), train_seconds=c.get("train_seconds"))
    v["gap"] = c["val_loss_x"] - c["train_loss_x"] if c.get("train_loss_x") is not None else None
    return v


def summarize(recs: list, optimizers: dict, tuning: dict) -> list:
    """Rows: (budget kind, N, optimizer) over the final runs that finished, mean ± std per metric."""
    final = [r for r in recs if r["phase"] == "final" and r["finished"]
             and (not tuning or r["hp"] == tuning.get(r["optimizer"], {}).get("chosen", r["hp"]))]
    rows = []
    keys = sorted({(c["budget"], c["N"]) for r in final for c in r["cells"]}, key=lambda k: (k[0] != "grads", k[1]))
    for kind, n in keys:
        for name, spec in optimizers.items():
            if kind == "steps" and not spec.two_pass:
                continue  # a one-gradient optimizer's N steps are its N gradient evaluations
            cells = [(r, c) for r in final if r["optimizer"] == name for c in r["cells"]
                     if c["budget"] == kind and c["N"] == n]
            if not cells:
                continue
            vals = [_cell_values(c) for _, c in cells]
            row = dict(budget=kind, N=n, optimizer=name, label=spec.label, seeds=sorted(r["seed"] for r, _ in cells),
                       steps=cells[0][1]["step"], grad_evals=cells[0][1]["grad_evals"], hp=cells[0][0]["hp"],
                       hessian_converged=sum(bool(c.get("hessian_converged")) for _, c in cells
                                             if "hessian_converged" in c),
                       hessian_measured=sum("hessian_converged" in c for _, c in cells))
            for m in METRICS:
                row[m] = _stat([v[m] for v in vals])
            rows.append(row)
    for row in rows:  # against AdamW and Schedule-Free AdamW at the same budget (N steps = N grads for them)
        for ref in ("adamw", "sf_adamw"):
            base = next((r for r in rows if r["optimizer"] == ref and r["N"] == row["N"] and r["budget"] == "grads"), None)
            row[f"vs_{ref}"] = (_verdict(row["val_loss_x"], base["val_loss_x"]) if base and row["optimizer"] != ref
                                else "")
    return rows


def _verdict(a, b) -> str:
    if a is None or b is None:
        return ""
    d = a["mean"] - b["mean"]
    if abs(d) <= max(a["std"], b["std"]):
        return f"tie ({d:+.3f})"
    return f"{'better' if d < 0 else 'worse'} ({d:+.3f})"


def _f(s, digits=3):
    if s is None:
        return "—"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _g(s):
    return "—" if s is None else f"{s['mean']:.3g} ± {s['std']:.2g}"


def markdown(rows: list, meta: dict) -> str:
    head = ("| budget | optimizer | hp | steps | grad evals | val loss (x) | val ppl (x) | val loss (y) "
            "| train loss (grad pt) | train loss (x) | gap (val−train at x) | λmax | SAM sharpness ρ=0.05 "
            "| 1-D rise ±0.2 | vs AdamW (val x) | vs SF-AdamW (val x) | train s |\n" + "|---" * 17 + "|\n")
    lines = []
    for r in rows:
        conv = ""
        if r["hessian_measured"]:
            conv = "" if r["hessian_converged"] == r["hessian_measured"] else \
                f" ({r['hessian_converged']}/{r['hessian_measured']} conv.)"
        hp = ", ".join(f"{k} {v:g}" for k, v in r["hp"].items())
        bud = f"{r['N']} {'grads' if r['budget'] == 'grads' else 'steps'}"
        ts = "—" if r["train_seconds"] is None else f"{r['train_seconds']['mean']:.0f}"
        lines.append(f"| {bud} | {r['label']} | {hp} | {r['steps']} | {r['grad_evals']} | {_f(r['val_loss_x'])} "
                     f"| {_f(r['val_ppl_x'], 2)} | {_f(r['val_loss_y'])} | {_f(r['train_loss_grad_point'])} "
                     f"| {_f(r['train_loss_x'])} | {_f(r['gap'])} | {_g(r['hessian_top'])}{conv} "
                     f"| {_g(r['sharpness'])} | {_g(r['landscape_rise'])} | {r['vs_adamw']} | {r['vs_sf_adamw']} | {ts} |")
    seeds = sorted({s for r in rows for s in r["seeds"]})
    note = (f"\nMean ± sample std over seeds {seeds}. Losses in nats per byte (perplexity per byte). "
            "x: the evaluation weights (schedule-free average; AdamW/PSGD: the weights; heavyball MSAM: the "
            "unperturbed weights); y: the schedule-free gradient point. Flatness measures (λmax by power iteration, "
            f"tol {meta.get('hessian_tol', '?')}, ≤ {meta.get('hessian_iters', '?')} HVPs; SAM sharpness; rise of the "
            "train loss at α = ±0.2 along a filter-normalized random direction) on a fixed set of training "
            "windows, at each run's largest budget only. 'tie' = |Δ| ≤ the larger std. train s = training seconds "
            "to that budget under load (not a speed figure).\n")
    return head + "\n".join(lines) + "\n" + note


def _flat_cells(final: list, name: str) -> list:
    """The cells of ``name`` that carry the flatness measures (each run's largest budget, equal gradients)."""
    cs = [c for r in final if r["optimizer"] == name for c in r["cells"] if c["budget"] == "grads" and "hessian_top" in c]
    top = max((c["N"] for c in cs), default=None)
    return [c for c in cs if c["N"] == top]


def plots(recs: list, rows: list, optimizers: dict, out: Path) -> list:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n for n in optimizers if any(r["optimizer"] == n for r in rows)]
    colors = dict(zip(optimizers, plt.get_cmap("tab10").colors))
    final = [r for r in recs if r["phase"] == "final" and r["finished"]]
    written = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        rs = [r for r in final if r["optimizer"] == name]
        longest = max(r["steps"] for r in rs)
        rs = [r for r in rs if r["steps"] == longest]
        grads = sorted({p["grads"] for r in rs for p in r["curve"]})
        ys = [[p["val_loss_x"] for r in rs for p in r["curve"] if p["grads"] == g] for g in grads]
        m = np.array([np.mean(y) for y in ys])
        s = np.array([np.std(y, ddof=1) if len(y) > 1 else 0.0 for y in ys])
        style = "--" if not optimizers[name].anytime else "-"
        ax.plot(grads, m, style, color=colors[name], label=optimizers[name].label)
        ax.fill_between(grads, m - s, m + s, color=colors[name], alpha=0.15)
    ax.set_xlabel("gradient evaluations")
    ax.set_ylabel("validation loss at x (nats/byte)")
    ax.set_title("validation loss vs gradient evaluations (mean ± std over seeds)\n"
                 "dashed: a cosine run of the largest budget, seen on its way")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    lo = min((r["val_loss_x"]["mean"] for r in rows if r["val_loss_x"]), default=None)
    if lo is not None:
        ax.set_ylim(lo - 0.1, lo + 1.2)
    fig.tight_layout()
    fig.savefig(out / "val_vs_grads.png", dpi=110)
    plt.close(fig)
    written.append("val_vs_grads.png")

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        cs = _flat_cells(final, name)
        if not cs:
            continue
        a = cs[0]["landscape_1d"]["alphas"]
        y = np.array([c["landscape_1d"]["losses"] for c in cs])
        ax.plot(a, y.mean(0), color=colors[name], label=f"{optimizers[name].label}, N = {cs[0]['N']}",
                ls="-" if optimizers[name].core else "--")
    ax.set_xlabel("α (filter-normalized random direction)")
    ax.set_ylabel("train loss at x + α·d (mean over seeds)")
    ax.set_title("1-D loss landscape at the final x (mean over seeds; the run's largest budget N)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "landscape_1d.png", dpi=110)
    plt.close(fig)
    written.append("landscape_1d.png")

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, title in ((axes[0], "hessian_top", "top Hessian eigenvalue λmax"),
                           (axes[1], "sharp", f"SAM sharpness (ρ={SHARP_RHO})")):
        for name in names:
            cs = _flat_cells(final, name)
            xs = [c["hessian_top"] if key == "hessian_top" else c["sam_sharpness"][SHARP_RHO] for c in cs]
            ax.scatter(xs, [c["val_loss_x"] for c in cs], color=colors[name], label=optimizers[name].label,
                       marker="o" if all(c["hessian_converged"] for c in cs) else "x")
        ax.set_xlabel(title + " (train loss at x)")
        ax.set_ylabel("validation loss at x")
        ax.grid(alpha=0.3)
    axes[0].set_title("x: power iteration not converged for that run")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sharpness_vs_val.png", dpi=110)
    plt.close(fig)
    written.append("sharpness_vs_val.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    first = min((r["seed"] for r in final), default=None)
    for name in names:
        for r in final:
            if r["optimizer"] != name or r["seed"] != first:
                continue
            for c in r["cells"]:
                if c["budget"] == "grads" and "hessian_history" in c:
                    h = c["hessian_history"]
                    ax.plot(range(1, len(h) + 1), h, marker=".", color=colors[name], label=optimizers[name].label)
    ax.set_xlabel("Hessian-vector products")
    ax.set_ylabel("Rayleigh quotient λ_k")
    ax.set_title(f"power iteration (seed {first}, each run's largest budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "hessian_convergence.png", dpi=110)
    plt.close(fig)
    written.append("hessian_convergence.png")
    return written


def report(out: Path, optimizers: dict, args=None) -> list:
    """Write summary.json, table.md and the plots; returns the summary rows."""
    recs, meta, tuning = _load(out)
    rows = summarize(recs, optimizers, tuning)
    (out / "summary.json").write_text(json.dumps(dict(tuning=tuning, rows=rows), indent=1))
    (out / "table.md").write_text(markdown(rows, meta))
    plots(recs, rows, optimizers, out)
    return rows
