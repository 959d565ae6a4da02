"""Resuming a DeepSpeed checkpoint on another world size or ZeRO stage (``checkpoint.convert``).

A DeepSpeed ZeRO checkpoint is partitioned for the world size and stage that wrote it; DeepSpeed's
own loader refuses another world size. With ``checkpoint.convert = "auto"`` (the default) the job then
converts it into DeepSpeed's universal format with our state (z, exp_avg, exp_avg_sq and every param
group's counters, mode and ascent scale), by calling on rank 0 the function behind the command users run themselves
(:func:`sharded_msam_sf.checkpoint.to_universal`)::

    python -m sharded_msam_sf.checkpoint to-universal <out_dir>/checkpoints/step_N <out_dir>/universal/.tmp-step_N

then seals the result like a checkpoint
(``job_state.json`` of the source, ``manifest.json`` with every file's SHA-256, ``"source"``: the
checkpoint it came from), renames it to ``<out_dir>/universal/step_N``, verifies it on every rank and
loads it with :func:`sharded_msam_sf.deepspeed.universal.load_universal` (ZeRO-1/2: DeepSpeed's
universal loader; ZeRO-3: ours). A relaunch at the same shape reuses a conversion that verifies; the
conversions of other steps are removed once one succeeds. The other ranks wait in a collective while
rank 0 converts (gloo: 30 min by default; a very large model can be converted ahead with the command
above). ``"never"``: such a resume is refused, naming the command and the original shape.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from .checkpoint import (CheckpointError, _agree, _barrier, make_private_dir, read_manifest, read_state, seal,
                         verify)

UNIVERSAL_DIR = "universal"
COMMAND = "python -m sharded_msam_sf.checkpoint to-universal"


def saved_shape(state: dict, world: int, stage: int) -> tuple[int, int]:
    """(world size, ZeRO stage) a DeepSpeed checkpoint of the job was written with (``world``/``stage``
    where its job_state.json does not say)."""
    return (int(state.get("world_size", world)),
            int(state.get("config", {}).get("engine", {}).get("zero_stage", stage)))


def needs_universal(cfg, world: int, state: dict) -> bool:
    """A DeepSpeed checkpoint from another world size or ZeRO stage: DeepSpeed's own load cannot take it."""
    shape = (world, cfg.engine.zero_stage)
    return cfg.engine.name == "deepspeed" and saved_shape(state, *shape) != shape


def check_convert_allowed(cfg, world: int, src: Path, state: dict) -> None:
    """Raise for checkpoint.convert = never, naming what works."""
    if cfg.checkpoint.convert != "never":
        return
    w, stage = saved_shape(state, world, cfg.engine.zero_stage)
    raise CheckpointError(
        f"{src} was written by {w} rank(s) with ZeRO-{stage}, and this run has {world} rank(s) with ZeRO-"
        f"{cfg.engine.zero_stage}; checkpoint.convert is 'never'. Resume it through a universal checkpoint: "
        "--override checkpoint.convert=auto (the default), or convert it yourself with "
        f"`{COMMAND} {src} OUT`; or relaunch with {w} rank(s) and engine.zero_stage={stage}")


def _convert(src: Path, tmp: Path) -> float:
    """Convert ``src`` into ``tmp`` with :func:`sharded_msam_sf.checkpoint.to_universal` (the function
    behind the command users run); its seconds. Raises CheckpointError naming the command."""
    from ..checkpoint import to_universal
    from ..export import ExportError
    t0 = time.perf_counter()
    try:
        to_universal(src, tmp)
    except ExportError as e:
        raise CheckpointError(f"converting {src} into a universal checkpoint failed (`{COMMAND} {src} {tmp}`): "
                              f"{e}") from e
    return time.perf_counter() - t0


def _reusable(dest: Path, src: Path, rank: int, world: int) -> bool:
    """Collective: ``dest`` verifies and was converted from this very checkpoint (same run and step)."""
    if not (dest / "manifest.json").is_file():
        return False
    if verify(dest, rank, world, "deepspeed"):
        return False
    m, s = read_manifest(dest), read_manifest(src)
    return m.get("source_run_id") == s["run_id"] and m["step"] == s["step"]


def prepare_universal(cfg, src: Path, rank: int, world: int) -> tuple[Path, str]:
    """Collective: the verified universal checkpoint of ``src`` under ``<out_dir>/universal/`` (converted now,
    or reused), and a note for the log."""
    state = read_state(src)
    check_convert_allowed(cfg, world, src, state)
    root = Path(cfg.log.out_dir) / UNIVERSAL_DIR
    dest, tmp = root / src.name, root / f".tmp-{src.name}"
    w, stage = saved_shape(state, world, cfg.engine.zero_stage)
    what = f"{src} (written by {w} rank(s) with ZeRO-{stage})"
    if _reusable(dest, src, rank, world):
        return dest, f"{what}: resuming through the universal checkpoint {dest} (converted earlier)"

    def convert():
        if rank == 0:
            make_private_dir(root)
            shutil.rmtree(tmp, ignore_errors=True)
            return _convert(src, tmp)
        return 0.0
    seconds = _agree(convert, f"universal checkpoint {tmp}")
    source = read_manifest(src)
    seal(tmp, dest, state, rank, world, extra={"source": str(src), "source_run_id": source["run_id"]},
         replace_any=True)  # dest: the job's own conversion of an earlier checkpoint, rebuilt from it
    problems = verify(dest, rank, world, "deepspeed")
    if problems:
        raise CheckpointError(f"the universal checkpoint {dest} does not verify: " + "; ".join(problems[:3]) +
                              f". Remove {dest} and relaunch (it is converted again), or convert it with "
                              f"`{COMMAND} {src} OUT`")
    if rank == 0:
        for old in root.glob("step_*"):
            if old != dest:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return dest, f"{what}: converted in {seconds:.1f} s into the universal checkpoint {dest}, resuming from it"
