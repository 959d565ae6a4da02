"""Checks that run before any process group starts, so that a run fails at once, and once.

* every library the config needs, imported (not only found: a matplotlib built for numpy 1
  fails at import under numpy 2), named with the pip extra that installs it;
* the device: ``engine.device: cuda`` (or ``backend: nccl``) on a machine without a usable GPU;
* a stale build lock in torch's extension cache (:mod:`sharded_msam_sf.extension_lock`), which
  would make the DeepSpeed engine and the fused CPU kernel wait forever;
* a hint (not an error) when a CPU run leaves the thread count per process to torch.

:func:`check` returns the problems as sentences; the caller (``train.main``) prints them from
rank 0 only and exits 2, like any other config error.
"""
from __future__ import annotations

import importlib
import os
from typing import List, Optional, Tuple

from .config import JobConfig

PACKAGE = "sharded_msam_sf"


def _import_error(module: str) -> Optional[str]:
    """None if ``module`` imports, else the reason (the exception's first line)."""
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken build (AttributeError, RuntimeError from numpy's ABI)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def needed_modules(cfg: JobConfig) -> List[Tuple[str, str, str]]:
    """(module, extra, what needs it) for this config."""
    need = [("numpy", "train", "the data loader"), ("tqdm", "train", "the progress output")]
    if cfg.engine.name == "deepspeed":
        need.append(("deepspeed", "deepspeed", "engine.name 'deepspeed'"))
    if cfg.checkpoint.export:
        need.append(("safetensors", "train", "checkpoint.export (the x weights at the end; or set it to false)"))
    if cfg.log.plot:
        need.append(("matplotlib", "train", "log.plot (loss.png; or set it to false)"))
    if cfg.log.tensorboard:
        need.append(("tensorboard", "tensorboard", "log.tensorboard"))
    for name in ("wandb", "mlflow"):
        if getattr(cfg.log, name, None):
            need.append((name, name, f"log.{name}"))
    return need


def dependency_problems(cfg: JobConfig) -> List[str]:
    out = []
    for module, extra, why in needed_modules(cfg):
        err = _import_error(module)
        if err is not None:
            out.append(f"{why} needs the '{module}' package, which does not import ({err}): "
                       f"pip install '{PACKAGE}[{extra}]'")
    return out


def device_problems(cfg: JobConfig) -> List[str]:
    import torch
    e = cfg.engine
    wants_cuda = e.device == "cuda" or e.backend == "nccl"
    if not wants_cuda or torch.cuda.is_available():
        return []
    what = "config key 'engine.device' is 'cuda'" if e.device == "cuda" else "config key 'engine.backend' is 'nccl'"
    why = ("torch was built without CUDA" if torch.version.cuda is None else
           "no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, the driver)")
    return [f"{what} but this machine cannot use a GPU ({why}, torch {torch.__version__}); "
            "use engine.device 'cpu' or 'auto' and engine.backend 'gloo' or 'auto' "
            "(e.g. --override engine.device=cpu --override engine.backend=gloo)"]


def lock_problems(cfg: JobConfig) -> List[str]:
    from ..extension_lock import message, stale_locks
    locks = stale_locks()
    return [message(locks)] if locks else []


def check(cfg: JobConfig) -> List[str]:
    """Every problem that would stop this config later, as sentences (empty: go)."""
    return dependency_problems(cfg) + device_problems(cfg) + lock_problems(cfg)


def thread_hint(cfg: JobConfig, local_world: Optional[int]) -> Optional[str]:
    """A line for CPU runs whose thread count per process is torch's default (all cores per process)."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    import torch
    if cfg.engine.device == "cuda" or (cfg.engine.device == "auto" and torch.cuda.is_available()):
        return None
    cores = os.cpu_count() or 1
    ranks = local_world or 1
    threads = torch.get_num_threads()
    return (f"hint: OMP_NUM_THREADS is not set: each of the {ranks} local rank(s) uses {threads} thread(s) on "
            f"{cores} core(s); on a machine shared with other work, set OMP_NUM_THREADS (e.g. "
            f"{max(1, cores // ranks)}, or 1 on a loaded machine, where threads that wait for a core slow every step)")
