"""Token streams and deterministic batches.

- The embedded corpus: the Python standard library's own top-level source files
  (present on every machine with Python, no download), tokenized at byte level
  (vocab 256). Files are split between train and validation by a hash of their
  name, so the split is deterministic and no file is in both.
- Token files (nanoGPT style): a flat uint16/uint32 memmap. `data.path` is either a
  file (the last `val_fraction` of it is validation, unless `data.val_path` is
  given) or a directory holding train.bin and, optionally, val.bin.

Batches depend only on (seed, step), never on the world size or on the process:
step k draws `global_batch_size` window offsets from a generator seeded with
(seed, k), and data-parallel rank r's micro-batch m is the slice starting at sequence
(m·dp + r)·micro (`Batches(corpus, cfg, r, dp)`; with parallel.tp > 1 the tp ranks of one
model replica pass the same r). A resumed run therefore sees exactly the data of an
uninterrupted one, and every world size trains on the same global batch.
"""
from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, JobConfig


@dataclass
class Corpus:
    train: np.ndarray  # 1-D token arrays (uint8 / uint16 / uint32, possibly memmaps)
    val: np.ndarray
    vocab_size: int
    description: str

    def unigram_baseline(self, max_tokens: int = 10_000_000) -> float:
        """Cross-entropy (nats/token) of the validation tokens under the train unigram distribution
        (add-one smoothing): the loss of a model that ignores context."""
        counts = np.bincount(np.asarray(self.train[:max_tokens]), minlength=self.vocab_size)
        logp = np.log((counts + 1.0) / (counts.sum() + self.vocab_size))
        return float(-logp[np.asarray(self.val[:max_tokens]).astype(np.int64)].mean())


def stdlib_corpus(max_bytes: int, val_fraction: float) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise RuntimeError(f"no Python source files found in {root} for the embedded corpus; pass --data")
    train, val, total = [], [], 0
    for f in files:
        data = f.read_bytes()[: max_bytes - total]
        bucket = zlib.crc32(f.name.encode()) % 10_000
        (val if bucket < val_fraction * 10_000 else train).append(data)
        total += len(data)
        if total >= max_bytes:
            break
    to_arr = lambda parts: np.frombuffer(b"".join(parts), dtype=np.uint8)
    return Corpus(to_arr(train), to_arr(val), 256,
                  f"embedded corpus: {len(train) + len(val)} Python stdlib files from {root}, bytes")


def _memmap(path: Path, dtype: str, key: str) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size == 0 or size % itemsize:
        raise ConfigError(f"config key '{key}': {path} ({size} bytes) is not a whole number of {dtype} tokens")
    return np.memmap(path, dtype=dtype, mode="r")


def token_file_corpus(cfg: JobConfig) -> Corpus:
    d = cfg.data
    path = Path(d.path)
    if path.is_dir():
        train = _memmap(path / "train.bin", d.dtype, "data.path")
        val_file = Path(d.val_path) if d.val_path else path / "val.bin"
        val = _memmap(val_file, d.dtype, "data.val_path") if val_file.is_file() else None
    else:
        train = _memmap(path, d.dtype, "data.path")
        val = _memmap(Path(d.val_path), d.dtype, "data.val_path") if d.val_path else None
    if val is None:
        cut = int(len(train) * (1 - d.val_fraction))
        train, val = train[:cut], train[cut:]
    sample_max = int(max(np.asarray(train[:1_000_000]).max(), np.asarray(val[:1_000_000]).max()))
    if sample_max >= cfg.model.vocab_size:
        raise ConfigError(f"config key 'model.vocab_size' ({cfg.model.vocab_size}) is too small for "
                          f"{path}: it holds token id {sample_max} (wrong data.dtype?)")
    return Corpus(train, val, cfg.model.vocab_size, f"token file {path} ({d.dtype})")


def load_corpus(cfg: JobConfig) -> Corpus:
    corpus = (stdlib_corpus(cfg.data.corpus_max_bytes, cfg.data.val_fraction) if cfg.data.path is None
              else token_file_corpus(cfg))
    need = cfg.model.block_size + 2
    for name, arr in (("train", corpus.train), ("validation", corpus.val)):
        if len(arr) < need:
            raise ConfigError(f"the {name} split has {len(arr)} tokens, fewer than model.block_size + 2 "
                              f"({need}); give more data (data.path / data.corpus_max_bytes)")
    return corpus


def _windows(arr: np.ndarray, offsets: np.ndarray, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    buf = np.stack([np.asarray(arr[o: o + t + 1]).astype(np.int64) for o in offsets])
    xy = torch.from_numpy(buf)
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


class Batches:
    """The deterministic batch schedule of one rank."""

    def __init__(self, corpus: Corpus, cfg: JobConfig, rank: int, world_size: int):
        self.corpus, self.rank, self.world = corpus, rank, world_size
        self.t = cfg.model.block_size
        self.micro = cfg.train.micro_batch_size
        self.global_batch = cfg.train.global_batch_size
        self.accum = self.global_batch // (self.micro * world_size)
        self.seed = cfg.train.seed
        self.eval_batches = cfg.eval.batches

    def train_offsets(self, step: int) -> np.ndarray:
        """All `global_batch_size` window offsets of optimizer step `step` (0-based)."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.corpus.train) - self.t - 1, size=self.global_batch)

    def micro_batches(self, step: int, device: torch.device):
        """This rank's `accum` (inputs, targets) micro-batches of optimizer step `step`."""
        offsets = self.train_offsets(step)
        for m in range(self.accum):
            start = (m * self.world + self.rank) * self.micro
            x, y = _windows(self.corpus.train, offsets[start: start + self.micro], self.t)
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def eval_micro_batches(self, device: torch.device):
        """(inputs, targets, weight) for this rank's share of the fixed validation set: `eval.batches`
        micro-batches at evenly spaced offsets. Every rank yields the same count (some with weight 0)
        so that engines with collectives in forward (ZeRO-3, FSDP) stay in step."""
        n_val = len(self.corpus.val) - self.t - 1
        offsets = np.linspace(0, n_val, self.eval_batches * self.micro, dtype=np.int64)
        per_rank = -(-self.eval_batches // self.world)
        for j in range(per_rank):
            i = j * self.world + self.rank
            weight = 1.0 if i < self.eval_batches else 0.0
            i = min(i, self.eval_batches - 1)
            x, y = _windows(self.corpus.val, offsets[i * self.micro: (i + 1) * self.micro], self.t)
            yield x.to(device), y.to(device), weight
