"""Sealing checkpoints that have no ``manifest.json`` (those of earlier releases):
``python -m sharded_msam_sf.checkpoint seal DIR [--check]``.

The main job loads a checkpoint only after verifying it against its manifest (size and SHA-256 of every
file), because DCP's ``.metadata`` and DeepSpeed's files are pickles that their loaders unpickle with
``weights_only=False``. A checkpoint written before manifests existed (a step directory with the engine's
files and ``job_state.json``) is refused by the job, never overwritten and never removed. ``seal``:

1. checks that ``DIR`` (and the step directories in it) belong to this user and are writable by no one else;
2. hashes every file, then loads every pickle with the safe loaders of :mod:`sharded_msam_sf.safe_load`
   (``torch.load(weights_only=True)`` with DeepSpeed's allow-listed classes; DCP's ``.metadata`` through
   an unpickler admitting only torch's DCP metadata classes; every DCP item with ``weights_only=True``),
   so a file that would run code is refused and nothing is written;
3. hashes again (a file changed in between is refused), then writes ``job_state.json`` (with a run id,
   the same for all step directories sealed together) and ``manifest.json``, marked ``"sealed_by"``.

``DIR`` is a step directory, a ``checkpoints/`` directory or a run's ``out_dir``. Step directories that
already have a manifest are verified against it and left as they are (one that fails is reported, not
re-sealed). ``--check`` runs steps 1-2 only (also on a sealed checkpoint) and writes nothing: the check
for a checkpoint that comes from elsewhere (see docs/checkpoints.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import List, Optional

from .job.checkpoint import (MANIFEST, MANIFEST_FORMAT, STATE_FILE, CheckpointError, RunDirError, _hash_share,
                             _listing, atomic_write_bytes, check_private, read_state, verify_share)
from .safe_load import check_loads

__all__ = ["SealError", "step_dirs", "unsealed", "seal_checkpoint", "seal", "main", "COMMAND"]

COMMAND = "python -m sharded_msam_sf.checkpoint seal"


class SealError(RuntimeError):
    """A checkpoint that cannot be sealed (the message names the file and why)."""


def _is_step(p: Path) -> bool:
    return p.name.startswith("step_") and p.name[5:].isdigit()


def step_dirs(target: Path) -> List[Path]:
    """The step directories ``target`` names: itself, those under it, or those under its ``checkpoints/``."""
    target = Path(target)
    if not target.is_dir():
        raise SealError(f"{target} is not a directory")
    if (target / STATE_FILE).is_file() or _is_step(target):
        return [target]
    root = target / "checkpoints" if (target / "checkpoints").is_dir() else target
    found = sorted((p for p in root.iterdir() if _is_step(p)), key=lambda p: int(p.name[5:]))
    if not found:
        raise SealError(f"{target} holds no checkpoint (no job_state.json, no step_* directories)")
    return found


def unsealed(root: Path) -> List[Path]:
    """The step directories under ``checkpoints/`` root without a manifest (symlinks included: refused later)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _is_step(p) and not (p / MANIFEST).is_file()),
                  key=lambda p: int(p.name[5:]))


def _world_size(ckpt: Path, state: dict) -> int:
    if isinstance(state.get("world_size"), int):
        return state["world_size"]
    ranks = len(list(ckpt.glob("*_optim_states.pt")))
    return ranks or 1


def check_checkpoint(ckpt: Path) -> List[str]:
    """Steps 1-2 of the module docstring: the problems (empty: safe to seal)."""
    try:
        if ckpt.is_symlink():
            return [f"{ckpt} is a symlink; a checkpoint directory is sealed where it is, not through a link"]
        check_private(ckpt, "checkpoint")
        read_state(ckpt)
    except (CheckpointError, RunDirError, OSError) as e:
        return [str(e)]
    return check_loads(ckpt)


def seal_checkpoint(ckpt: Path, run_id: str) -> str:
    """Seal one step directory (the module docstring); a line saying what was done. Raises SealError."""
    if (ckpt / MANIFEST).is_file():
        problems = verify_share(ckpt)
        if problems:
            raise SealError(f"{ckpt} has a manifest it does not verify against (changed after its save; not "
                            "re-sealed): " + "; ".join(problems[:3]))
        return f"{ckpt}: sealed already, verifies"
    files, special = _listing(ckpt)
    if special:
        raise SealError(f"{ckpt}: " + "; ".join(special))
    before = _hash_share(ckpt, files, 0, 1)
    problems = check_checkpoint(ckpt)
    if problems:
        raise SealError(f"{ckpt} does not load with the safe loaders, not sealed:\n  " + "\n  ".join(problems))
    if _listing(ckpt)[0] != files or _hash_share(ckpt, files, 0, 1) != before:
        raise SealError(f"{ckpt} changed while it was being checked; not sealed")
    state = read_state(ckpt)
    state.setdefault("run_id", run_id)
    state.setdefault("engine", (state["config"].get("engine") or {}).get("name", "?"))
    state.setdefault("world_size", _world_size(ckpt, state))
    atomic_write_bytes(ckpt / STATE_FILE, json.dumps(state, indent=1).encode())
    listed = {rel: v for rel, v in before.items() if rel != STATE_FILE}
    listed.update(_hash_share(ckpt, [STATE_FILE], 0, 1))
    loss = state.get("train_loss")
    manifest = {"format": MANIFEST_FORMAT, "run_id": state["run_id"], "step": state["step"],
                "engine": state["engine"], "world_size": state["world_size"],
                "healthy": bool(state.get("healthy", not isinstance(loss, float) or loss == loss)),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sealed_by": COMMAND, "files": listed}
    atomic_write_bytes(ckpt / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return f"{ckpt}: sealed (run {state['run_id']}, step {state['step']}, {len(listed)} files)"


def seal(target: Path, check_only: bool = False) -> List[str]:
    """Seal (or, ``check_only``, check) every step directory ``target`` names; the lines to print. Raises
    SealError naming every checkpoint that failed (the others are sealed)."""
    dirs = step_dirs(Path(target))
    run_id = "sealed-" + uuid.uuid4().hex[:8]
    lines, failed = [], []
    for d in dirs:
        try:
            if check_only:
                problems = check_checkpoint(d)
                if problems:
                    raise SealError(f"{d} does not load with the safe loaders:\n  " + "\n  ".join(problems))
                lines.append(f"{d}: every file loads with the safe loaders")
            else:
                lines.append(seal_checkpoint(d, run_id))
        except SealError as e:
            failed.append(str(e))
    if failed:
        raise SealError("\n".join(failed + lines))
    return lines


def add_parser(sub) -> None:
    """The ``seal`` subcommand of ``python -m sharded_msam_sf.checkpoint``."""
    p = sub.add_parser("seal", help="verify that checkpoints without manifest.json load with safe loaders, then "
                                    "write their manifest (checkpoints of earlier releases)")
    p.add_argument("dir", help="a step directory, a checkpoints/ directory or a run's out_dir")
    p.add_argument("--check", action="store_true", help="only check that every file loads with the safe loaders "
                                                        "(also a sealed checkpoint); write nothing")


def run(args) -> int:
    try:
        for line in seal(Path(args.dir), check_only=args.check):
            print(line)
    except SealError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND)
    add_parser(ap.add_subparsers(dest="command", required=True))
    return run(ap.parse_args(["seal", *(argv or sys.argv[1:])]))
