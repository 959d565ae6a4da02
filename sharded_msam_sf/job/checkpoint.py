"""Atomic checkpoints, resume discovery, preemption signals and the eval-mode weight export.

Layout under `<out_dir>/checkpoints/`:

    step_000100/       a complete checkpoint: the engine's files + job_state.json (written last)
    .tmp-step_000200/  a checkpoint being written (never read; removed by the next save)
    latest             the name of the newest complete checkpoint (replaced atomically)

Every rank writes its part into the temporary directory; after a barrier rank 0
writes job_state.json, renames the directory into place and only then replaces
`latest`. A crash at any point leaves the previous checkpoint as `latest`.
Checkpoints assume a file system shared by all ranks (as DCP and DeepSpeed do).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist

STATE_FILE = "job_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, foreign, or from another run's layout."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load_torch_file(path: Path, map_location="cpu"):
    """torch.load(weights_only=True) with clear errors for a missing, truncated or foreign file."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError for bad files
        raise CheckpointError(f"cannot read checkpoint file {path} ({type(e).__name__}: {e}); "
                              "the file is truncated, corrupt or not a weights-only torch checkpoint") from e


class Checkpointer:
    def __init__(self, out_dir: str | os.PathLike, rank: int, keep: int):
        self.root = Path(out_dir) / "checkpoints"
        self.rank, self.keep = rank, keep

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:06d}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.root / "latest"
        if pointer.is_file():
            cand = self.root / pointer.read_text().strip()
            if (cand / STATE_FILE).is_file():
                return cand
        done = self.complete()
        return done[-1] if done else None

    def complete(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        done = [p for p in self.root.glob("step_*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()]
        return sorted(done, key=lambda p: int(p.name[5:]))

    def save(self, engine, step: int, job_state: dict) -> Path:
        """Collective: every rank must call it."""
        final = self.root / self.name(step)
        tmp = self.root / f".tmp-{self.name(step)}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        engine.save(tmp)
        dist.barrier()
        if self.rank == 0:
            atomic_write_bytes(tmp / STATE_FILE, json.dumps(dict(job_state, step=step), indent=1).encode())
            if final.exists():  # re-saving the same step (e.g. a signal right after an interval save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            atomic_write_bytes(self.root / "latest", final.name.encode())
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def read_state(path: Path) -> dict:
        f = Path(path) / STATE_FILE
        if not f.is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f} is corrupt: {e}") from None


def resolve_resume(cfg, checkpointer: Checkpointer) -> Path | None:
    """The checkpoint to resume from under checkpoint.resume (auto/never/must/a path)."""
    mode = cfg.checkpoint.resume
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if mode == "never" and not restarted:
        return None
    if mode not in ("auto", "never", "must"):
        return Path(mode)
    found = checkpointer.latest()
    if found is None and mode == "must":
        raise CheckpointError(f"--resume: no complete checkpoint under {checkpointer.root}")
    return found


def export_weights(engine, path: Path, rank: int, meta: dict) -> None:
    """Write the full model weights (call in the optimizer's eval mode: x) for inference; collective."""
    sd = engine.full_state_dict()
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"model": sd, "meta": meta}, path)


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop agrees on it across ranks and checkpoints before exiting.
    A second signal interrupts immediately."""

    def __init__(self):
        self.signum = 0
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum:
            self.restore()
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signum = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
