"""The training loop of the main job (engine-agnostic; see engines.py for the engines)."""
from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import (Checkpointer, StopSignal, acquire_run_lock, check_config_change,
                         export_weights, plan_resume, record_run_id)
from .config import JobConfig
from .data import Batches, Corpus
from .progress import Progress, TensorBoard, optimizer_scalars, peak_memory_mib, plot_losses
from .universal import check_convert_allowed, needs_universal, prepare_universal


class Interrupted(Exception):
    """Raised after the checkpoint taken on SIGTERM/SIGINT; carries the signal number."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} at step {step} (checkpoint saved)")
        self.signum, self.step = signum, step


class Diverged(RuntimeError):
    """Too many consecutive steps skipped because the gradients were not finite."""


@torch.no_grad()
def evaluate(engine, batches: Batches, device: torch.device, counted: float = 1.0, recalibrate_bn: int = 0,
             step: int = 0) -> float:
    """Mean validation loss at the optimizer's x (eval mode), over the fixed validation set; a rank
    adds its losses with weight ``counted`` (0 on all but one rank of each model replica: the other
    tp ranks' losses are the same, the pipeline's first stages have none). ``recalibrate_bn``: first
    re-estimate the BatchNorm statistics at x (:func:`recalibrate_at_x`)."""
    engine.optimizer.eval()
    if recalibrate_bn:
        recalibrate_at_x(engine, batches, device, recalibrate_bn, step)
    engine.set_train(False)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    micro = list(batches.eval_micro_batches(device))
    for (_, _, w), loss in zip(micro, engine.forward_micro_batches([(x, y) for x, y, _ in micro])):
        loss = loss.double()
        total += torch.stack([loss * w, loss.new_tensor(w)]) * counted
    dist.all_reduce(total)
    engine.set_train(True)
    engine.optimizer.train()
    return (total[0] / total[1]).item()


def recalibration_micro_batches(batches: Batches, device: torch.device, n: int, step: int) -> list:
    """This rank's first ``n`` training micro-batches of the steps ``step − 1, step − 2, …, 0`` (the newest
    first), then ``step, step + 1, …`` if those are too few: deterministic, so a resumed run recalibrates
    on the same data as the uninterrupted one."""
    import itertools
    out: list = []
    for s in itertools.chain(range(step - 1, -1, -1), itertools.count(step)):
        out += list(batches.micro_batches(s, device))[: n - len(out)]
        if len(out) >= n:
            return out
    return out


def check_recalibration(cfg: JobConfig, model: torch.nn.Module) -> None:
    """``eval.recalibrate_bn`` > 0 needs a model with BatchNorm running statistics (a ValueError otherwise)."""
    from ..bn import running_stat_modules
    if cfg.eval.recalibrate_bn and not running_stat_modules(model):
        raise ValueError(f"config key 'eval.recalibrate_bn' = {cfg.eval.recalibrate_bn}: the model has no "
                         "BatchNorm layer with running statistics (the job's GPT uses LayerNorm); set it to 0")


def recalibrate_at_x(engine, batches: Batches, device: torch.device, n: int, step: int) -> int:
    """The BatchNorm running statistics at x (the optimizer must be in eval mode), combined over all ranks,
    on ``n`` training micro-batches per rank, through the engine's own forward (DDP/FSDP/DeepSpeed)."""
    from ..bn import recalibrate
    micro = recalibration_micro_batches(batches, device, n, step)
    return recalibrate(engine.model, micro, n, optimizer=None,
                       forward=lambda model, batch: engine.forward_micro_batches([batch]))


def run(cfg: JobConfig, env, engine, corpus: Corpus, dry_run: bool = False) -> dict:
    out_dir = Path(cfg.log.out_dir)
    rank0 = env.rank == 0
    lock = acquire_run_lock(out_dir, env.rank)  # held until this process exits (or run() returns)
    try:
        return _run(cfg, env, engine, corpus, dry_run, out_dir, rank0)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: JobConfig, env, engine, corpus: Corpus, dry_run: bool, out_dir: Path, rank0: bool) -> dict:
    batches = Batches(corpus, cfg, env.dp_rank, env.dp_size)  # the tp ranks of a replica read the same batch
    counted = float(env.reports_loss)  # losses enter the logged means once per data-parallel rank
    opt = engine.optimizer
    two_pass = cfg.optimizer_kwargs.get("sam_mode", "one_pass") == "two_pass"
    opt.train()
    engine.set_train(True)
    check_recalibration(cfg, engine.model)

    step, state = 0, {}
    plan = plan_resume(cfg, Checkpointer(out_dir, env.rank, cfg.checkpoint.keep, env.world_size))
    ckpt = Checkpointer(out_dir, env.rank, cfg.checkpoint.keep, env.world_size, run_id=plan.run_id)
    resume_from, state = plan.path, plan.state
    notes = list(plan.notes)
    if resume_from is not None:
        convert = needs_universal(cfg, env.world_size, state)  # DeepSpeed, another world size or ZeRO stage
        if convert:
            check_convert_allowed(cfg, env.world_size, resume_from, state)
        applied = check_config_change(state["config"], cfg, resume_from,
                                      allow=("engine.zero_stage",) if convert else ())
        notes += [f"config changed since {resume_from.name} (applied): {line}" for line in applied]
        if convert:
            universal, note = prepare_universal(cfg, resume_from, env.rank, env.world_size)
            notes.append(note)
            engine.load_universal(universal)
        else:
            engine.load(resume_from)
        step = state["step"]
    record_run_id(plan.run_id, env.rank)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.block_size
    progress = Progress(rank0, out_dir, cfg.log.progress, step, cfg.train.max_steps, tokens_per_step)
    baseline = state.get("unigram_baseline") or corpus.unigram_baseline()
    aside = progress.truncate_metrics(step, fresh=resume_from is None)
    if aside is not None:
        notes.append(f"the earlier metrics.jsonl of {out_dir} is kept as {aside.name} (a new run starts its own)")
    for note in notes:
        progress.message(note)
    if resume_from is not None:
        progress.message(f"resumed from {resume_from} (run {plan.run_id}) at step {step}")
    else:
        progress.message(f"new run {plan.run_id} in {out_dir}")
    ranks = f"{env.world_size} rank{'s' if env.world_size > 1 else ''}"
    split = env.tp > 1 or env.pp > 1
    dp_ranks = f"{env.dp_size} data-parallel rank{'s' if env.dp_size > 1 else ''}" if split else ranks
    layout = (f" = dp {env.dp_size} x tp {env.tp}" if env.tp > 1 else
              f" = pp {env.pp} x dp {env.dp_size}, {cfg.parallel.schedule}" if env.pp > 1 else "")
    progress.message(f"{cfg.engine.name} ({ranks}{layout}, {env.device.type}, {cfg.engine.dtype}) | "
                     f"{engine.n_params:,} params | {corpus.description} | "
                     f"global batch {cfg.train.global_batch_size} = micro-batch {cfg.train.micro_batch_size} x "
                     f"{dp_ranks} x {cfg.grad_accum} accumulation step(s) | unigram baseline {baseline:.4f}")
    if dry_run:
        return {"step": step, "dry_run": True}

    board = TensorBoard(rank0 and cfg.log.tensorboard, out_dir, step)
    stop = StopSignal()
    val_loss, train_loss = state.get("val_loss"), state.get("train_loss", math.nan)
    # [sum of losses, count] since the last log record; kept in checkpoints so a resumed log matches
    window = torch.tensor(state.get("loss_window", [0.0, 0.0]), dtype=torch.float64, device=env.device)

    skipped_before, consecutive_skips, healthy = getattr(opt, "skipped_steps", 0), 0, True
    start_step, skipped_at_start = step, skipped_before
    last_healthy = resume_from

    def job_state():
        return {"train_loss": train_loss, "val_loss": val_loss, "unigram_baseline": baseline,
                "loss_window": window.tolist(), "healthy": healthy,
                "world_size": env.world_size, "engine": cfg.engine.name, "config": cfg.to_dict()}

    try:
        while step < cfg.train.max_steps:
            t0 = time.perf_counter()
            torch.manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + env.dp_rank)  # dropout: resumable
            micro = list(batches.micro_batches(step, env.device))
            losses = engine.backward_micro_batches(micro)
            if two_pass:
                opt.move_to_ascent()
                ascent = optimizer_scalars(opt)  # step() resets the two_pass ascent scale
                engine.backward_micro_batches(micro)
                opt.move_from_ascent()
            engine.step()
            step += 1
            # one small all-reduce: the loss for the log and the stop flag (a signal may reach one rank only)
            # the mean in float64: (l0 + l1) / 2 is then the same number on 1 rank x 2 micro-batches as on 2 ranks;
            # the loss and its count from one rank per replica (the mean over the data-parallel ranks)
            flags = torch.stack([torch.stack(losses).double().mean() * counted, torch.tensor(
                                 counted, dtype=torch.float64, device=env.device), torch.tensor(
                                 float(stop.signum > 0), dtype=torch.float64, device=env.device)]).to(env.device)
            dist.all_reduce(flags)
            window += flags[:2]
            skipped_now = getattr(opt, "skipped_steps", 0)  # the same on every rank (the skip is agreed)
            consecutive_skips = consecutive_skips + 1 if skipped_now > skipped_before else 0
            skipped_before = skipped_now
            healthy = consecutive_skips == 0 and math.isfinite((flags[0] / flags[1]).item())
            limit = cfg.train.max_skipped_steps
            if limit and consecutive_skips >= limit:
                raise Diverged(
                    f"stopped at step {step}: {consecutive_skips} consecutive steps were skipped because the "
                    f"gradients held NaN/inf (train.max_skipped_steps = {limit}). The newest checkpoint whose "
                    f"loss was finite (never pruned): {last_healthy}. Lower the learning rate, check the data, "
                    "or raise train.max_skipped_steps")
            step_time = time.perf_counter() - t0
            progress.train_time += step_time
            progress.steps_timed += 1
            if board.writer is not None:
                now = optimizer_scalars(opt)
                if two_pass:
                    now.update({k: ascent[k] for k in ("optimizer/m_norm", "optimizer/ascent_scale")})
                board.scalars(step, {"train/loss": (flags[0] / flags[1]).item(), "perf/tokens_per_s":
                                     tokens_per_step / step_time, "optimizer/skipped_steps": skipped_now, **now})

            last = step == cfg.train.max_steps
            logged = step % cfg.log.interval == 0 or last
            if progress.mode == "bar" and not logged:  # the bar moves every step, the log every interval
                progress.update(step, (flags[0] / flags[1]).item())
            if logged:
                train_loss = (window[0] / window[1]).item()  # mean over ranks and steps
                window.zero_()
                progress.record(step=step, train_loss=train_loss, tokens=step * tokens_per_step,
                                tokens_per_s=progress.tokens_per_s())
                progress.update(step, train_loss)
            if (cfg.eval.interval and step % cfg.eval.interval == 0) or last:
                val_loss = evaluate(engine, batches, env.device, counted, cfg.eval.recalibrate_bn, step)
                progress.record(step=step, val_loss=val_loss)
                board.scalars(step, {"val/loss": val_loss})
                board.flush()
                progress.message(f"step {step}: val loss {val_loss:.4f} (eval mode, x)")
            signum = (stop.signum or signal.SIGTERM) if flags[2].item() > 0 else 0  # a signal on any rank
            if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or last or signum:
                t_save = time.perf_counter()
                path = ckpt.save(engine, step, job_state())
                last_healthy = path if healthy else last_healthy
                progress.message(f"checkpoint: {path} ({time.perf_counter() - t_save:.1f} s)")
            if signum and stop.repeats:
                progress.message(f"{stop.repeats} repeated stop signal(s) absorbed while the checkpoint was "
                                 "taken (torchrun forwards its own SIGTERM)")
            if signum and not last:
                raise Interrupted(signum, step)
    finally:
        stop.restore()
        board.close()
        progress.close()  # the bar; messages below print as lines

    ran, skipped = step - start_step, getattr(opt, "skipped_steps", 0) - skipped_at_start
    if ran and skipped >= ran:  # shorter than max_skipped_steps, yet nothing was learnt: not a success
        raise Diverged(
            f"no step was applied: all {ran} step(s) of this run were skipped because the gradients held NaN/inf "
            f"(the optimizer's warnings name the likely cause). The checkpoint {out_dir / 'checkpoints'} holds the "
            "unchanged state. Lower the learning rate / rho, check the data")
    if cfg.checkpoint.export:
        opt.eval()
        if cfg.eval.recalibrate_bn:
            recalibrate_at_x(engine, batches, env.device, cfg.eval.recalibrate_bn, step)
        export_path = out_dir / "export"  # model.safetensors + export.json; `python -m sharded_msam_sf.export
        export_weights(engine, export_path, env.rank,  # CKPT` writes the same files from the last checkpoint
                       {"step": step, "weights": "x", "config": cfg.to_dict()})
        opt.train()
        progress.message(f"eval-mode (x) weights: {export_path}")
    peaks = [None] * env.world_size
    dist.all_gather_object(peaks, round(peak_memory_mib(env.device), 1))
    summary = {"final_step": step, "train_loss": train_loss, "val_loss": val_loss, "unigram_baseline": baseline,
               "tokens_per_s": progress.tokens_per_s(), "peak_mem_mib_per_rank": peaks}
    if rank0:
        progress.record(step=step, summary=summary)
        png = plot_losses(progress.metrics_path, out_dir / "loss.png", baseline) if cfg.log.plot else None
        if png:
            progress.message(f"loss curve: {png}")
        elif cfg.log.plot:
            progress.message("loss curve skipped: matplotlib is not installed (pip install matplotlib)")
        mem = "/".join(f"{p:.0f}" for p in peaks)
        kind = "GPU" if env.device.type == "cuda" else "RSS"
        val = "n/a" if val_loss is None else f"{val_loss:.4f}"  # none: resumed at max_steps, eval.interval 0
        progress.message(
            f"done: step {step} | train loss {train_loss:.4f} | val loss {val} "
            f"(unigram baseline {baseline:.4f}) | {progress.tokens_per_s():,.0f} tok/s | "
            f"peak {kind} MiB per rank {mem}")
    return summary
