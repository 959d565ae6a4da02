"""What the user sees (rank 0 only): a tqdm bar or plain lines on stderr, metrics.jsonl (the
machine-readable record), TensorBoard event files, a loss-curve PNG and a one-line summary."""
from __future__ import annotations

import errno
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm


def peak_memory_mib(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA) or the peak resident set size (CPU), MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2 ** 20


class Progress:
    """log.progress: "bar" (a tqdm bar, moved every step), "lines" (one line per log.interval, for logs:
    ``step 10/200 | loss 2.9012 | 1,234 tok/s | elapsed 00:07 | ETA 02:13``), "none", or "auto" (a bar
    on a TTY, lines otherwise). Messages go above the bar. Disabled (enabled=False) on ranks > 0."""

    def __init__(self, enabled: bool, out_dir: Path, mode: str, start_step: int, max_steps: int,
                 tokens_per_step: int, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode
        self.start_step, self.max_steps = start_step, max_steps
        self.tokens_per_step = tokens_per_step
        self.metrics_path = out_dir / "metrics.jsonl"
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
        self.train_time = 0.0  # seconds spent in training steps (not eval / checkpoints)
        self.steps_timed = 0
        self.bar = None  # the tqdm bar, from the first update on

    def truncate_metrics(self, after_step: int, fresh: bool = False) -> Path | None:
        """Resuming: drop this run's records after `after_step` (its checkpoint; those steps are run again).
        A fresh run (``fresh``) never truncates an earlier run's metrics.jsonl: it is renamed to
        ``metrics.<time>.jsonl`` (returned) and a new one is started."""
        if not self.enabled or not self.metrics_path.is_file():
            return None
        if fresh:
            if self.metrics_path.stat().st_size == 0:
                return None
            aside = self.metrics_path.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            n = 1
            while aside.exists():
                aside, n = self.metrics_path.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}-{n}.jsonl"), n + 1
            os.replace(self.metrics_path, aside)
            return aside
        keep = [ln for ln in self.metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= after_step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in keep))
        return None

    def record(self, **rec) -> None:
        if self.enabled:
            try:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise OSError(errno.ENOSPC, f"no space left on device while writing {self.metrics_path}",
                                  str(self.metrics_path)) from e
                raise

    def tokens_per_s(self) -> float:
        return self.steps_timed * self.tokens_per_step / self.train_time if self.train_time else 0.0

    def update(self, step: int, loss: float) -> None:
        if not self.enabled or self.mode == "none":
            return
        if self.mode == "bar":
            if self.bar is None:
                self.bar = tqdm(total=self.max_steps, initial=self.start_step, file=self.stream, unit="step",
                                dynamic_ncols=True)
            self.bar.set_postfix_str(f"loss {loss:.4f} | {self.tokens_per_s():,.0f} tok/s", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        eta = self.train_time / max(self.steps_timed, 1) * (self.max_steps - step)
        self.stream.write(f"step {step}/{self.max_steps} | loss {loss:.4f} | {self.tokens_per_s():,.0f} tok/s | "
                          f"elapsed {tqdm.format_interval(self.train_time)} | ETA {tqdm.format_interval(eta)}\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled and self.mode != "none":
            tqdm.write(text, file=self.stream)  # above the bar, if there is one
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TensorBoard:
    """Per-step scalars in out_dir/tensorboard (rank 0, log.tensorboard), via torch.utils.tensorboard:
    train/loss, val/loss, optimizer/lr (γ_t after warm-up), optimizer/m_norm (‖m‖), optimizer/ascent_scale
    (s, the ascent is y + s·m), optimizer/skipped_steps (cumulative) and perf/tokens_per_s.
    A resumed run purges the events after its checkpoint's step."""

    def __init__(self, enabled: bool, out_dir: Path, start_step: int):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                if value is not None:
                    self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def optimizer_scalars(opt) -> dict:
    """lr, ‖m‖ and the ascent scale from the optimizer's first param group (the plain
    AdamWMSAMScheduleFree's, also behind the DeepSpeed facade): s = ∓ρ/‖m‖, so ‖m‖ = ρ/|s|
    (0 when s = 0 with ρ > 0; absent when ρ = 0: no m is kept). Read it right after the
    step (one_pass) or right after move_to_ascent() (two_pass: step() resets s)."""
    while not hasattr(opt, "param_groups") and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    g = opt.param_groups[0]
    scale, rho = float(g["ascent_scale"]), g["rho"]
    return {"optimizer/lr": float(g.get("scheduled_lr") or g["lr"]), "optimizer/ascent_scale": scale,
            "optimizer/m_norm": (rho / abs(scale) if scale else 0.0) if rho else None}


def plot_losses(metrics_path: Path, png_path: Path, baseline: float | None = None) -> Path | None:
    """Train and validation loss against steps from metrics.jsonl; None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    train = [(r["step"], r["train_loss"]) for r in recs if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train (at the gradient point)")
    if val:
        ax.plot(*zip(*val), "o-", label="validation (eval mode: x)")
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
