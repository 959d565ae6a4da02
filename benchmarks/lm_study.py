"""The language-model study: does AdamW + MSAM + Schedule-Free help a GPT?

    python benchmarks/lm_study.py                  # the CPU study (tuning + 3 seeds, 2 budgets)
    python benchmarks/lm_study.py --quick          # the reduced grid of the CI test (~1 min)
    python benchmarks/lm_study.py --report-only    # table + plots from the finished cells
    torchrun --nproc_per_node 8 benchmarks/lm_study.py --preset gpt124m --data DIR_OR_FILE \\
        --tokens 2.5e9 --optimizers adamw,msam_sf_1p        # GPT-2 small, bf16, on GPUs

Everything a run uses is the main job's own code (sharded_msam_sf.job): the config
(``load_config`` with ``--set`` overrides), the corpus (``load_corpus``: the embedded stdlib
byte corpus, or the token file of ``--data``), the deterministic batches (``Batches``), the
process group (``init_distributed``: plain python, torchrun, ...), the engine (``build_engine``:
DDP around the job's GPT, bf16 autocast, gradient accumulation, clipping), the optimizer the
engine builds from the config's optimizer section (AdamWMSAMScheduleFree), the training step
of ``job/trainer.py`` (the two_pass ``move_to_ascent`` / second backward / ``move_from_ascent``
sequence included) and its ``evaluate`` (validation loss at x). The baselines replace the
engine's optimizer with theirs, nothing else.

Optimizers (``OPTIMIZERS``):

    adamw            torch.optim.AdamW, warm-up + cosine decay to 10% (a run per budget)
    sf_adamw         schedulefree.AdamWScheduleFree
    msam_sf_1p       AdamWMSAMScheduleFree one_pass (MSAM on SF, one gradient per step)
    msam_sf_2p       AdamWMSAMScheduleFree two_pass (ascent along the momentum, two gradients)
    sam_sf           AdamWMSAMScheduleFree two_pass, ascent_beta=0 (SAM on SF)
    msam_sf_1p_seed  one_pass with the seed note's literal sign θ + ρ·m/||m|| (the ablation;
                     benchmarks/flatness.py's SeedSignMSAM, built from the same kwargs)
    psgd_kron        heavyball.PSGDKron, warm-up + cosine (a run per budget)
    hb_msam          heavyball.MSAMLaProp (MSAM with a per-tensor norm), warm-up + cosine

Budgets: N gradient evaluations of the global batch ("grads"), or N optimizer steps
("steps"; a two_pass step costs two gradients). The schedule-free optimizers need no
schedule, so one run to the largest budget is measured at every budget on its way
(its warm-up is a fixed number of steps, the same for every budget); a two_pass run
takes N/2 steps for the "grads" budget and also yields the "steps" budget for every
N ≤ largest/2. The cosine ones (adamw, psgd_kron, hb_msam) run once per budget.

Tuning (seed 0, the smallest budget, chosen on validation loss at x; ``Study.tune``):
lr-only optimizers (AdamW, SF-AdamW, PSGD) on an lr grid, plus one point beyond the edge
when an edge point wins; the SAM family (MSAM/SAM on SF, heavyball MSAM) at Schedule-Free
AdamW's chosen lr with ρ on ``rho_grid`` (every earlier tuning run of that optimizer in
the store counts as a candidate too); the seed-sign ablation takes one_pass's values, so
that only the sign differs. Then ``--seeds`` seeds (1, 2, ...) at the chosen values. Every
(optimizer, hyperparameters, seed, run length) run is one JSON file under OUT/cells/,
written when it finishes; a rerun skips the finished ones.

Measured at every budget point of a run: the train loss at the gradient point (mean of
the step losses over the last 10% of the steps), validation loss and perplexity (per
byte/token) at x (``optimizer.eval()``) and, for the schedule-free ones, at y; and at
x on a fixed set of training windows, with ``sharded_msam_sf.analysis``: the top Hessian
eigenvalue by power iteration (its history and whether it converged), SAM sharpness at
``SHARPNESS_RHOS``, the loss along one filter-normalized random direction. Wall time and
gradient evaluations per run. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flatness.SeedSignMSAM, lm_study_report

from sharded_msam_sf.analysis import (evaluation_weights, loss_landscape_1d, sam_sharpness,  # noqa: E402
                                      top_hessian_eigenvalue)
from sharded_msam_sf.job.config import load_config  # noqa: E402
from sharded_msam_sf.job.data import Batches, _windows, load_corpus  # noqa: E402
from sharded_msam_sf.job.engines import build_engine, init_distributed  # noqa: E402
from sharded_msam_sf.job.trainer import evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Spec:
    label: str
    kind: str                 # "msam" (the engine's AdamWMSAMScheduleFree), "seed_sign", "sf", "adamw", "psgd", "hb_msam"
    lr_grid: tuple
    rho: float | None = None  # default ρ of the SAM family (stage 1 of the tuning); None: no ρ
    two_pass: bool = False
    ascent_beta: float | None = None
    anytime: bool = True      # schedule-free: one run measured at every budget
    short_budget: bool = True # a cosine optimizer also gets its own run at the smaller budgets
    tune_like: str | None = None  # take the chosen hyperparameters of this optimizer instead of tuning
    rho_grid: tuple = ()      # the SAM family: ρ tuned on this grid at Schedule-Free AdamW's chosen lr
    core: bool = True         # False: a comparison, measured at the smallest budget only, after the core runs

    @property
    def sam_mode(self) -> str:
        return "two_pass" if self.two_pass else "one_pass"


LR_GRID = (1e-3, 3e-3, 1e-2)
LR_STEP = 10 ** 0.5    # an lr on the grid's edge that wins gets its neighbour this factor further out tried
OPTIMIZERS = {
    "adamw": Spec("AdamW (warm-up + cosine)", "adamw", LR_GRID, anytime=False),
    "sf_adamw": Spec("Schedule-Free AdamW", "sf", LR_GRID),
    "msam_sf_1p": Spec("MSAM + SF one_pass", "msam", LR_GRID, rho=1.0, rho_grid=(0.03, 0.1)),
    "msam_sf_2p": Spec("MSAM + SF two_pass", "msam", LR_GRID, rho=0.05, two_pass=True, rho_grid=(0.02, 0.05)),
    "sam_sf": Spec("SAM + SF (two_pass, β_m=0)", "msam", LR_GRID, rho=0.05, two_pass=True, ascent_beta=0.0,
                   rho_grid=(0.02, 0.05)),
    "msam_sf_1p_seed": Spec("one_pass, seed's sign (+ρ·m/|m|)", "seed_sign", LR_GRID, rho=1.0,
                            tune_like="msam_sf_1p", core=False),
    "psgd_kron": Spec("PSGD-Kron (heavyball, cosine)", "psgd", (3e-4, 1e-3), anytime=False, core=False),
    "hb_msam": Spec("heavyball MSAM (per-tensor norm, cosine)", "hb_msam", LR_GRID, rho=0.1, anytime=False,
                    rho_grid=(0.03, 0.1), core=False),
}
SHARPNESS_RHOS = (0.01, 0.05, 0.1)
MIN_LR_FRAC = 0.1      # cosine decays to 10% of the peak lr
WEIGHT_DECAY = 0.1     # decoupled, every parameter, every optimizer
RISE_AT = 0.2          # landscape rise = mean of L(x ± 0.2·d) − L(x)

# the CPU study's model and data (see docs/lm_study.md for why)
CPU_SETTINGS = [
    "engine.name=ddp", "engine.device=cpu", "engine.dtype=fp32",
    "model.block_size=128", "model.n_layer=4", "model.n_head=4", "model.n_embd=144",
    "data.corpus_max_bytes=175000", "data.val_fraction=0.15",
    "train.global_batch_size=4", "train.micro_batch_size=4", "train.grad_clip=1.0",
    "eval.batches=16",
]
QUICK_SETTINGS = [
    "engine.name=ddp", "engine.device=cpu", "engine.dtype=fp32",
    "model.block_size=32", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
    "data.corpus_max_bytes=175000", "data.val_fraction=0.15",
    "train.global_batch_size=4", "train.micro_batch_size=4", "train.grad_clip=1.0",
    "eval.batches=4",
]
# GPT-2 small (124M): 12 layers, 12 heads, 768 wide, context 1024, GPT-2's vocabulary padded to 50304;
# bf16 autocast over fp32 master weights; 480 sequences of 1024 tokens per step (~0.5M tokens, as GPT-2)
GPT124M_SETTINGS = [
    "engine.name=ddp", "engine.device=auto", "engine.dtype=bf16",
    "model.vocab_size=50304", "model.block_size=1024", "model.n_layer=12", "model.n_head=12", "model.n_embd=768",
    "train.global_batch_size=480", "train.micro_batch_size=16", "train.grad_clip=1.0",
    "eval.batches=64",
]
GPT124M_LR = {"adamw": 6e-4, "sf_adamw": 1.5e-3, "msam_sf_1p": 1.5e-3, "msam_sf_2p": 1.5e-3, "sam_sf": 1.5e-3,
              "msam_sf_1p_seed": 1.5e-3, "psgd_kron": 3e-4, "hb_msam": 1.5e-3}


def log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[lm_study {time.strftime('%H:%M:%S', time.gmtime())}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- optimizers
def warmup_cosine(warmup: int, total: int, min_frac: float = MIN_LR_FRAC):
    """LambdaLR factor: linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_frac`` at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def optimizer_section(spec: Spec, hp: dict, warmup: int) -> list:
    """The job config's optimizer section (as --set overrides) of a run of the SAM family / SF AdamW."""
    params = {"lr": hp["lr"], "weight_decay": WEIGHT_DECAY, "warmup_steps": warmup,
              "rho": hp.get("rho", 0.0), "sam_mode": spec.sam_mode}
    if spec.ascent_beta is not None:
        params["ascent_beta"] = spec.ascent_beta
    return [f"optimizer.params={json.dumps(params)}"]


def install_optimizer(name: str, spec: Spec, hp: dict, engine, cfg, warmup: int, steps: int):
    """Put the run's optimizer into the engine (the engine built AdamWMSAMScheduleFree from the config's
    optimizer section; the SAM-family runs keep it). Returns the lr scheduler or None."""
    params = list(engine.model.parameters())
    if spec.kind == "msam":
        return None  # the job's own construction: build_engine -> AdamWMSAMScheduleFree(**cfg.optimizer_kwargs)
    if spec.kind == "seed_sign":
        from flatness import SeedSignMSAM
        engine.optimizer = SeedSignMSAM(params, **cfg.optimizer_kwargs)
        return None
    if spec.kind == "sf":
        import schedulefree
        kw = cfg.optimizer_kwargs
        engine.optimizer = schedulefree.AdamWScheduleFree(
            params, lr=kw["lr"], betas=kw.get("betas", (0.9, 0.999)), weight_decay=kw["weight_decay"],
            warmup_steps=kw["warmup_steps"])
        return None
    if spec.kind == "adamw":
        engine.optimizer = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=WEIGHT_DECAY)
    else:
        import heavyball
        import heavyball.utils
        heavyball.utils.compile_mode = None  # torch.compile on loaded CPUs costs minutes
        warnings.filterwarnings("ignore", message="Learning rate changed between steps")
        if spec.kind == "psgd":
            engine.optimizer = heavyball.PSGDKron(params, lr=hp["lr"], weight_decay=WEIGHT_DECAY)
        else:
            engine.optimizer = heavyball.MSAMLaProp(params, lr=hp["lr"], weight_decay=WEIGHT_DECAY,
                                                    sam_step_size=hp["rho"])
    return torch.optim.lr_scheduler.LambdaLR(engine.optimizer, warmup_cosine(warmup, steps))


class _Modes:
    """The optimizer as ``evaluate`` and ``evaluation_weights`` see it: its own eval()/train() where it
    has them (schedule-free x; heavyball MSAM's unperturbed weights), no-ops otherwise (AdamW, PSGD), or
    no-ops always (``at_y``: measure the parameters as they are)."""

    def __init__(self, opt, at_y: bool = False):
        self.opt, self.at_y = opt, at_y

    def eval(self):
        if not self.at_y and callable(getattr(self.opt, "eval", None)):
            self.opt.eval()

    def train(self):
        if not self.at_y and callable(getattr(self.opt, "train", None)):
            self.opt.train()


class _EvalView:
    """What job/trainer.py's ``evaluate`` needs of an engine, with the optimizer's modes of ``_Modes``."""

    def __init__(self, engine, modes: _Modes):
        self.optimizer, self.set_train, self.forward_micro_batches = modes, engine.set_train, engine.forward_micro_batches


# ---------------------------------------------------------------- one run
@dataclass
class Run:
    name: str
    hp: dict
    seed: int
    steps: int                       # optimizer steps of the run
    cells: list                      # [(budget kind, N, step)] measured on the way
    phase: str                       # "tune" or "final"
    flatness: bool = True
    key: str = field(init=False)

    def __post_init__(self):
        hp = "-".join(f"{k}{v:g}" for k, v in sorted(self.hp.items()))
        self.key = f"{self.phase}-{self.name}-{hp}-seed{self.seed}-steps{self.steps}"


def plan_cells(spec: Spec, budgets: list, steps_budgets: bool = True) -> list:
    """[(steps of the run, [(kind, N, step)])] for one optimizer and seed: the runs and where they are measured
    (a comparison, ``core=False``, at the smallest budget only)."""
    budgets = sorted(budgets) if spec.core else [min(budgets)]
    if not spec.anytime:
        return [(n, [("grads", n, n), ("steps", n, n)]) for n in budgets if spec.short_budget or n == max(budgets)]
    top = max(budgets)
    if not spec.two_pass:
        return [(top, [(kind, n, n) for n in budgets for kind in ("grads", "steps")])]
    cells = [("grads", n, n // 2) for n in budgets]
    if steps_budgets:
        cells += [("steps", n, n) for n in budgets if n <= top // 2]
    return [(top // 2, cells)]


def measure_batches(corpus, cfg, env, n_batches: int, per_batch: int):
    """This rank's share of a fixed set of training windows (the same for every run and seed), for the flatness
    measures: n_batches × world batches of per_batch sequences, evenly spaced over the train split."""
    t = cfg.model.block_size
    total = n_batches * env.dp_size
    offsets = np.linspace(0, len(corpus.train) - t - 2, total * per_batch, dtype=np.int64)
    out = []
    for j in range(n_batches):
        i = j * env.dp_size + env.dp_rank
        x, y = _windows(corpus.train, offsets[i * per_batch:(i + 1) * per_batch], t)
        out.append((x.to(env.device), y.to(env.device)))
    return out


def lm_loss(module, batch):
    x, y = batch
    return module(x, y)


def flatness(engine, opt, batches, args) -> dict:
    """The analysis measures of the training loss at the evaluation weights (x), in model.eval()."""
    model = engine.model
    with evaluation_weights(_Modes(opt)):
        hess = top_hessian_eigenvalue(model, lm_loss, batches, iters=args.hessian_iters, tol=args.hessian_tol, seed=0)
        sharp = {f"{r:g}": sam_sharpness(model, lm_loss, batches, rho=r) for r in SHARPNESS_RHOS}
        alphas = np.linspace(-1, 1, args.landscape_points).round(6).tolist()
        land = loss_landscape_1d(model, lm_loss, batches, alphas=alphas, seed=123)
    a, ls = np.array(land.alphas), np.array(land.losses)
    at0 = float(np.interp(0.0, a, ls))
    rise = 0.5 * (float(np.interp(-RISE_AT, a, ls)) + float(np.interp(RISE_AT, a, ls))) - at0
    s0 = next(iter(sharp.values()))
    return dict(train_loss_x=s0.loss, grad_norm_x=s0.grad_norm,
                hessian_top=hess.eigenvalue, hessian_converged=hess.converged, hessian_iterations=hess.iterations,
                hessian_residual=hess.residual, hessian_history=hess.history,
                sam_sharpness={k: v.sharpness for k, v in sharp.items()},
                landscape_rise=rise, landscape_1d=dict(alphas=land.alphas, losses=land.losses))


def train_run(run: Run, base_settings: list, env, corpus, args) -> dict:
    """Train one run with the job's engine and step; measure it at its cells. Returns the record."""
    spec = OPTIMIZERS[run.name]
    settings = base_settings + [f"train.seed={run.seed}", f"train.max_steps={run.steps}"]
    settings += optimizer_section(spec, run.hp if spec.kind in ("msam", "seed_sign", "sf") else {"lr": 1e-3},
                                  args.warmup)
    cfg = load_config(None, settings, world_size=env.world_size)
    engine = build_engine(cfg, env)  # DDP around build_model(cfg): the GPT initialised from train.seed
    sched = install_optimizer(run.name, spec, run.hp, engine, cfg, args.warmup, run.steps)
    opt = engine.optimizer
    if callable(getattr(opt, "train", None)):
        opt.train()
    engine.set_train(True)
    batches = Batches(corpus, cfg, env.dp_rank, env.dp_size)
    meas = measure_batches(corpus, cfg, env, args.measure_batches, args.measure_per_batch) if run.flatness else None
    passes = 2 if spec.two_pass else 1
    curve_steps = {s for s in range(1, run.steps + 1) if (s * passes) % args.curve_every == 0}
    cell_steps = {c[2] for c in run.cells}
    losses, curve, cells, grads = [], [], [], 0
    t0 = time.perf_counter()
    train_time = measure_time = 0.0
    for step in range(run.steps):
        ts = time.perf_counter()
        torch.manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + env.dp_rank)  # as job/trainer.py
        micro = list(batches.micro_batches(step, env.device))
        step_losses = engine.backward_micro_batches(micro)
        grads += 1
        if spec.two_pass:
            opt.move_to_ascent()
            engine.backward_micro_batches(micro)
            grads += 1
            opt.move_from_ascent()
        engine.step()
        if sched is not None:
            sched.step()
        loss = torch.stack(step_losses).double().mean()
        dist.all_reduce(loss)
        losses.append(loss.item() / env.world_size)
        if not math.isfinite(losses[-1]):
            log(f"{run.key}: non-finite train loss at step {step + 1}; stopping the run")
            break
        done = step + 1
        train_time += time.perf_counter() - ts
        if done in curve_steps or done in cell_steps:
            tm = time.perf_counter()
            val_x = evaluate(_EvalView(engine, _Modes(opt)), batches, env.device)
            curve.append(dict(step=done, grads=grads, val_loss_x=val_x))
            for kind, n, at in run.cells:
                if at != done:
                    continue
                window = losses[-max(5, done // 10):]
                rec = dict(budget=kind, N=n, step=done, grad_evals=grads, val_loss_x=val_x, val_ppl_x=math.exp(val_x),
                           train_loss_grad_point=statistics.fmean(window), train_seconds=train_time)
                if spec.kind in ("msam", "seed_sign", "sf"):  # schedule-free: also at y
                    if spec.kind != "sf" and not spec.two_pass:
                        opt.move_from_ascent()  # one_pass: the params sit at y + s·m; the next train() re-applies it
                    rec["val_loss_y"] = evaluate(_EvalView(engine, _Modes(opt, at_y=True)), batches, env.device)
                    opt.eval()
                    opt.train()
                if run.flatness and n == max(c[1] for c in run.cells):
                    rec.update(flatness(engine, opt, meas, args))
                cells.append(rec)
            measure_time += time.perf_counter() - tm
    engine.close()
    finished = len(losses) == run.steps and math.isfinite(losses[-1])
    return dict(key=run.key, optimizer=run.name, phase=run.phase, hp=run.hp, seed=run.seed, steps=run.steps,
                passes_per_step=passes, grad_evals=grads, finished=finished, cells=cells, curve=curve,
                train_losses=losses[::max(1, len(losses) // 200)], wall_seconds=time.perf_counter() - t0,
                train_seconds=train_time, measure_seconds=measure_time, warmup=args.warmup,
                n_params=engine.n_params, world_size=env.world_size, load_avg=_loadavg())


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# ---------------------------------------------------------------- the study
class Store:
    """One JSON file per finished run under OUT/cells/ (rank 0 writes; every rank reads)."""

    def __init__(self, out: Path, rank: int):
        self.dir, self.rank = out / "cells", rank
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)

    def get(self, run: Run):
        p = self.dir / f"{run.key}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def put(self, rec: dict) -> None:
        if self.rank == 0:
            tmp = self.dir / f".{rec['key']}.tmp"
            tmp.write_text(json.dumps(rec))
            tmp.replace(self.dir / f"{rec['key']}.json")

    def tuning_runs(self, name: str, steps: int) -> list:
        recs = [json.loads(p.read_text()) for p in sorted(self.dir.glob(f"tune-{name}-*-seed0-steps{steps}.json"))]
        return [r for r in recs if r["optimizer"] == name]

    def all(self) -> list:
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))]


def cell_at(rec: dict, kind: str, n: int):
    return next((c for c in rec["cells"] if c["budget"] == kind and c["N"] == n), None)


def score(rec: dict, n: int) -> float:
    c = cell_at(rec, "grads", n)
    v = c["val_loss_x"] if c is not None and rec["finished"] else math.inf
    return v if math.isfinite(v) else math.inf


class Study:
    def __init__(self, args, env, corpus, settings):
        self.args, self.env, self.corpus, self.settings = args, env, corpus, settings
        self.store = Store(args.out, env.rank)
        self.done = self.ran = 0
        self.t0 = time.time()

    def get_or_run(self, run: Run) -> dict:
        rec = self.store.get(run)
        if rec is not None:
            self.done += 1
            return rec
        t = time.time()
        rec = train_run(run, self.settings, self.env, self.corpus, self.args)
        self.store.put(rec)
        self.ran += 1
        last = rec["cells"][-1] if rec["cells"] else {}
        log(f"{run.key}: val x {last.get('val_loss_x', float('nan')):.4f}"
            + (f" λmax {last['hessian_top']:.3g}{'' if last['hessian_converged'] else ' (nc)'}"
               if "hessian_top" in last else "")
            + f" [{time.time() - t:.0f} s; {self.ran} run, {self.done} cached; {(time.time() - self.t0) / 60:.1f} min"
            f"; load {rec['load_avg'][0] if rec['load_avg'] else '?'}]")
        return rec

    def tune(self, name: str) -> dict:
        """The chosen hyperparameters of ``name`` on seed 0 at the smallest budget, by validation loss at x.

        lr-only optimizers: the lr grid, then (``--lr-extend`` times) one more point beyond the edge when an edge
        point wins. The SAM family (``rho_grid``): Schedule-Free AdamW's chosen lr (the family is SF-AdamW plus a
        perturbation; ρ → 0 is SF-AdamW) and ρ on the grid. Every tuning run of ``name`` already in the store (an
        earlier, wider search) is a candidate too, and is listed."""
        spec, n = OPTIMIZERS[name], self.args.tune_budget
        steps = n // 2 if spec.two_pass else n
        one = lambda hp: self.get_or_run(Run(name, hp, 0, steps, [("grads", n, steps)], "tune", flatness=False))
        tried = []
        if spec.rho_grid:
            lr = self.tuned["sf_adamw"]["chosen"]["lr"] if "sf_adamw" in self.tuned else spec.lr_grid[0]
            for rho in self.args.rho_grid.get(name, spec.rho_grid):
                hp = {"lr": lr, "rho": rho}
                tried.append((hp, score(one(hp), n)))
        else:
            for lr in self.args.lr_grid.get(name, spec.lr_grid):
                tried.append(({"lr": lr}, score(one({"lr": lr}), n)))
            for _ in range(self.args.lr_extend):  # the best lr on the grid's edge: one more point beyond it
                lrs = sorted(h["lr"] for h, _ in tried)
                best = min(tried, key=lambda t: t[1])[0]["lr"]
                if len(lrs) < 2 or best not in (lrs[0], lrs[-1]):
                    break
                lr = float(f"{best / LR_STEP if best == lrs[0] else best * LR_STEP:.3g}")
                tried.append(({"lr": lr}, score(one({"lr": lr}), n)))
        seen = [h for h, _ in tried]
        for rec in self.store.tuning_runs(name, steps):
            if rec["hp"] not in seen:
                tried.append((rec["hp"], score(rec, n)))
        best = min(tried, key=lambda t: t[1])
        return dict(chosen=best[0], val_loss_x=best[1], budget=n, tried=[dict(hp=h, val_loss_x=v) for h, v in tried])

    def run(self) -> dict:
        a = self.args
        chosen = self.tuned = {}
        for name in a.optimizers:
            like = OPTIMIZERS[name].tune_like
            if a.hp.get(name):
                chosen[name] = dict(chosen=a.hp[name], given=True)
            elif like is not None and like in chosen:
                chosen[name] = dict(chosen=chosen[like]["chosen"], like=like)
            else:
                chosen[name] = self.tune(name)
            log(f"{name}: chosen {chosen[name]['chosen']}")
        if self.env.rank == 0:
            (a.out / "tuning.json").write_text(json.dumps(chosen, indent=1))
        for core in (True, False):  # every seed of the core optimizers first, then the comparisons
            for seed, name in [(s, n) for s in a.seed_list for n in a.optimizers if OPTIMIZERS[n].core == core]:
                spec = OPTIMIZERS[name]
                for steps, cells in plan_cells(spec, a.budgets, a.steps_budgets):
                    self.get_or_run(Run(name, chosen[name]["chosen"], seed, steps, cells, "final",
                                        flatness=a.hessian_iters > 0))
        return chosen


# ---------------------------------------------------------------- command line
def parse_hp(items) -> dict:
    """--hp NAME.lr=3e-3 NAME.rho=1 -> {NAME: {"lr": 3e-3, "rho": 1.0}}."""
    out = {}
    for item in items or []:
        try:
            key, val = item.split("=", 1)
            name, hp = key.split(".", 1)
            out.setdefault(name, {})[hp] = float(val)
        except ValueError:
            raise SystemExit(f"--hp expects NAME.lr=VALUE or NAME.rho=VALUE, got {item!r}") from None
        if name not in OPTIMIZERS or hp not in ("lr", "rho"):
            raise SystemExit(f"--hp {item!r}: NAME must be one of {list(OPTIMIZERS)}, and the key lr or rho")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the reduced grid of the CI test (tiny GPT, ~1 min)")
    p.add_argument("--preset", choices=["cpu", "gpt124m"], default="cpu",
                   help="cpu: the study's 1M-parameter GPT on the embedded corpus (default); gpt124m: GPT-2 small, "
                        "bf16, on --data, no tuning (lrs from --hp or GPT124M_LR)")
    p.add_argument("--data", default=None, help="a token file or a directory with train.bin/val.bin (data.path)")
    p.add_argument("--tokens", type=float, default=None,
                   help="gpt124m: the token budget(s) (comma-separated) -> gradient evaluations = tokens / (global batch x "
                        "block size)")
    p.add_argument("--budgets", default=None, help="gradient evaluations, comma-separated (default 50,100; quick 10,20)")
    p.add_argument("--seeds", type=int, default=None, help="seeds after tuning (default 3; quick 2; gpt124m 1)")
    p.add_argument("--optimizers", default=None, help="comma-separated subset of " + ",".join(OPTIMIZERS))
    p.add_argument("--hp", nargs="*", default=None, help="fixed hyperparameters, NAME.lr=V NAME.rho=V (skips tuning)")
    p.add_argument("--set", nargs="*", default=[], dest="overrides",
                   help="job config overrides key=value after the preset's (e.g. model.n_layer=2)")
    p.add_argument("--tune-budget", type=int, default=None,
                   help="gradient evaluations of the tuning runs (default: the largest budget)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 10%% of the tuning budget)")
    p.add_argument("--curve-every", type=int, default=None, help="validation every N gradient evaluations")
    p.add_argument("--hessian-iters", type=int, default=None, help="power iterations (0: no flatness measures)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the machine is shared)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/lm_study; quick runs/lm_quick)")
    p.add_argument("--report-only", action="store_true", help="write the table and plots from the finished cells")
    a = p.parse_args(argv)
    gpu = a.preset == "gpt124m"
    if gpu and a.quick:
        p.error("--quick is the CPU preset's reduced grid; with --preset gpt124m shrink the model with --set")
    if gpu and a.data is None:
        p.error("--preset gpt124m needs --data (a token file or a directory with train.bin / val.bin)")
    a.settings = (GPT124M_SETTINGS if gpu else QUICK_SETTINGS if a.quick else CPU_SETTINGS) + list(a.overrides)
    a.optimizers = [s for s in (a.optimizers or ("adamw,msam_sf_1p" if gpu else ",".join(OPTIMIZERS))).split(",") if s]
    bad = [s for s in a.optimizers if s not in OPTIMIZERS]
    if bad:
        p.error(f"--optimizers: unknown {bad}; expected names from {list(OPTIMIZERS)}")
    a.hp = parse_hp(a.hp)
    if gpu:
        for name in a.optimizers:
            spec = OPTIMIZERS[name]
            hp = {"lr": GPT124M_LR[name], **({"rho": spec.rho} if spec.rho is not None else {})}
            a.hp[name] = {**hp, **a.hp.get(name, {})}
    a.token_budgets = [float(t) for t in str(a.tokens).split(",")] if a.tokens is not None else None
    if a.token_budgets is not None and a.budgets is not None:
        p.error("give --tokens or --budgets, not both")
    if a.token_budgets is None:
        a.budgets = [int(v) for v in (a.budgets or ("10,20" if a.quick else "50,100")).split(",")]
    a.seeds = a.seeds if a.seeds is not None else (1 if gpu else 2 if a.quick else 3)
    a.seed_list = list(range(1, a.seeds + 1))
    a.lr_grid = {name: (3e-3, 1e-2) for name in OPTIMIZERS} if a.quick else {}
    a.rho_grid = {}
    a.lr_extend = 0 if a.quick or gpu else 1
    a.steps_budgets = True
    a.hessian_iters = a.hessian_iters if a.hessian_iters is not None else (2 if a.quick else 5)
    a.hessian_tol = 1e-2
    a.landscape_points = 5 if a.quick else 9
    a.measure_batches, a.measure_per_batch = (1, 4) if a.quick else (1, 8)
    a.out = Path(a.out) if a.out else ROOT / ("runs/lm_quick" if a.quick else
                                              "runs/lm_gpt124m" if gpu else "benchmarks/results/lm_study")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        from lm_study_report import report
        report(args.out, OPTIMIZERS, args)
        return 0
    cfg0 = load_config(None, args.settings + ([f"data.path={args.data}"] if args.data else []))
    args.settings = args.settings + ([f"data.path={args.data}"] if args.data else [])
    env = init_distributed(cfg0)
    cfg0 = load_config(None, args.settings, world_size=env.world_size)
    if args.token_budgets is not None:
        per_grad = cfg0.train.global_batch_size * cfg0.model.block_size
        args.budgets = [max(2, int(round(t / per_grad))) for t in args.token_budgets]
    args.tune_budget = args.tune_budget or max(args.budgets)
    args.warmup = args.warmup if args.warmup is not None else max(1, args.tune_budget // 10)
    args.curve_every = args.curve_every or max(1, min(args.budgets) // 2)
    corpus = load_corpus(cfg0)
    log(f"{corpus.description}: train {len(corpus.train):,} / val {len(corpus.val):,} tokens; unigram baseline "
        f"{corpus.unigram_baseline():.4f}; {env.world_size} rank(s) on {env.device}; budgets {args.budgets} "
        f"gradient evaluations of {cfg0.train.global_batch_size} x {cfg0.model.block_size} tokens; "
        f"seeds {args.seed_list}; out {args.out}")
    t0 = time.time()
    study = Study(args, env, corpus, args.settings)
    chosen = study.run()
    if env.rank == 0:
        meta = dict(command=" ".join(["python", "benchmarks/lm_study.py"] + (sys.argv[1:] if argv is None else list(argv))),
                    settings=args.settings, budgets=args.budgets, seeds=args.seed_list, warmup=args.warmup,
                    curve_every=args.curve_every, tune_budget=args.tune_budget, hessian_iters=args.hessian_iters, hessian_tol=args.hessian_tol,
                    sharpness_rhos=SHARPNESS_RHOS, weight_decay=WEIGHT_DECAY, min_lr_frac=MIN_LR_FRAC,
                    threads=args.threads, torch=torch.__version__,
                    world_size=env.world_size, device=str(env.device), train_tokens=len(corpus.train),
                    val_tokens=len(corpus.val), unigram_baseline=corpus.unigram_baseline(),
                    wall_seconds_this_invocation=time.time() - t0, chosen=chosen)
        (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
        from lm_study_report import report
        report(args.out, OPTIMIZERS, args)
        log(f"done in {(time.time() - t0) / 60:.1f} min ({study.ran} runs trained, {study.done} cached); wrote {args.out}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
