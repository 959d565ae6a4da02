"""What the user sees (rank 0 only): a progress bar or lines on stderr, metrics.jsonl,
a loss-curve PNG and a one-line summary."""
from __future__ import annotations

import errno
import json
import resource
import sys
import time
from pathlib import Path

import torch


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def peak_memory_mib(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA) or the peak resident set size (CPU), MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2 ** 20


class Progress:
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
        self.last_line_len = 0

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records of an earlier run after `after_step` (its checkpoint when resuming; all when
        starting afresh in the same out_dir)."""
        if not self.enabled or not self.metrics_path.is_file():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= after_step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

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

    def update(self, step: int, loss: float, force_line: bool = False) -> None:
        if not self.enabled or self.mode == "none":
            return
        done = step - self.start_step
        left = self.max_steps - step
        eta = self.train_time / max(self.steps_timed, 1) * left
        frac = step / self.max_steps
        text = (f"step {step}/{self.max_steps} | loss {loss:.4f} | {self.tokens_per_s():,.0f} tok/s | "
                f"elapsed {_fmt_time(self.train_time)} | ETA {_fmt_time(eta)}")
        if self.mode == "bar":
            width = 24
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            line = f"[{bar}] {frac:4.0%} {text}"
            self.stream.write("\r" + line.ljust(self.last_line_len))
            self.last_line_len = len(line)
            if step >= self.max_steps:
                self.stream.write("\n")
        elif force_line or done >= 0:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled and self.mode != "none":
            if self.mode == "bar" and self.last_line_len:
                self.stream.write("\n")
                self.last_line_len = 0
            self.stream.write(text + "\n")
            self.stream.flush()


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
