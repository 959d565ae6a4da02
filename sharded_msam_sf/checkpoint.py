"""DeepSpeed universal checkpoints with AdamWMSAMScheduleFree's state:
``python -m sharded_msam_sf.checkpoint to-universal CKPT OUT``.

DeepSpeed's converter (``deepspeed.checkpoint.ds_to_universal``) writes one folder per param with
``fp32.pt``, ``exp_avg.pt`` and ``exp_avg_sq.pt`` (the Adam keys are hard-coded) and
``zero/optimizer_state.pt`` with the param groups (where our counters live: ``k``, ``weight_sum``,
``lr_max``, ``train_mode``, ``at_ascent``, ``ascent_scale``, ...). Its loader is generic: it loads every
``<key>.pt`` of a param folder into the optimizer state, and copies the param groups. The one thing
missing is ``z``. This runs DeepSpeed's converter twice, the second time on a staging copy whose optimizer
files carry ``z`` under the key ``exp_avg``, and moves that run's ``exp_avg.pt`` files in as ``z.pt``:
DeepSpeed's converter, unchanged, does all the slicing and merging.

Sources: ZeRO-1/2 checkpoints of any world size (ZeRO-3 is refused: see below).
Targets: ZeRO-1 and ZeRO-2 at any world size (``"checkpoint": {"load_universal": true}``; measured: a
2-rank ZeRO-2 run resumed at 1 rank equals the uninterrupted run within 3e-8, one_pass and two_pass: fp32
round-off of the different reduction). Not ZeRO-3: DeepSpeed's ZeRO-3 universal loader hard-codes
``fp32``, ``exp_avg``, ``exp_avg_sq`` and would drop z, so the output is made unloadable by a ZeRO-3 engine (it fails at
``load_checkpoint``) rather than resume on a wrong trajectory; and a ZeRO-3 source is refused (its
universal output would need the module weights rebuilt for a ZeRO-1/2 engine, not done here).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import List, Optional

import torch

from .export import ExportError, _ds_files, load_file, resolve, verify_manifest
from .weights_io import replace_dir

__all__ = ["to_universal", "main"]


def _converter(src: Path, out: Path, workers: int) -> None:
    from deepspeed.checkpoint import ds_to_universal as conv
    args = argparse.Namespace(input_folder=str(src), output_folder=str(out), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # universal_checkpoint_info: Megatron's, absent here
    with contextlib.redirect_stdout(sys.stderr):
        conv.main(args)


def _stage_z(ckpt: Path, optim: List[Path], stage_dir: Path) -> None:
    """A copy of ``ckpt`` whose optimizer files hold z under ``exp_avg`` (model files linked)."""
    stage_dir.mkdir()
    for f in ckpt.iterdir():
        if f.name.endswith("_optim_states.pt"):
            continue
        if f.is_file():
            os.symlink(f.resolve(), stage_dir / f.name)
    for f in optim:
        sd = load_file(f)
        osd = sd["optimizer_state_dict"]
        inner = "base_optimizer_state" if int(osd["zero_stage"]) <= 2 else "optimizer_state_dict"
        for i, st in osd[inner]["state"].items():
            if "z" not in st:
                raise ExportError(f"{f} (group {i}): no 'z' in the optimizer state {sorted(st)}: not a checkpoint "
                                  "of AdamWMSAMScheduleFree")
            st["exp_avg"] = st["z"]
            st.setdefault("exp_avg_sq", st["z"])
        torch.save(sd, stage_dir / f.name)


def _refuse_zero3_targets(out: Path) -> None:
    """DeepSpeed's ZeRO-3 universal loader (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) loads
    only ``fp32``, ``exp_avg`` and ``exp_avg_sq`` and the first param group: it would drop z (our optimizer
    would then start z afresh from the params: a silent wrong trajectory). It reads the Adam state under
    ``optimizer_state.pt['optimizer_state_dict']``, which the ZeRO-1/2 loader never reads: without that
    key a ZeRO-3 engine fails to load the checkpoint instead; and the ZeRO-3 engine finds no model states
    (it looks for ``zero_pp_rank_0_mp_rank_*_model_states.pt``, which the converter does not write)."""
    f = out / "zero" / "optimizer_state.pt"
    sd = torch.load(f, map_location="cpu", weights_only=False)  # written just now by DeepSpeed's converter
    if isinstance(sd, dict) and "optimizer_state_dict" in sd:
        del sd["optimizer_state_dict"]
        torch.save(sd, f)
    for stale in out.glob("zero_pp_rank_*_model_states.pt"):
        stale.unlink()


def to_universal(ckpt: os.PathLike | str, out: os.PathLike | str, workers: int = 1) -> Path:
    """Convert a DeepSpeed ZeRO-1/2 checkpoint (any world size; ZeRO-3 is refused) into DeepSpeed's universal
    format with ``z`` (see the module docstring); ``out`` is written under a temporary name and renamed at
    the end."""
    path = resolve(Path(ckpt))
    verify_manifest(path)
    optim, _ = _ds_files(path)
    osd = load_file(optim[0], mmap=True).get("optimizer_state_dict", {})
    if int(osd.get("zero_stage", 0)) == 3:
        raise ExportError(f"{path} is a ZeRO-3 checkpoint: converting it to a universal checkpoint with z is not "
                          "supported (DeepSpeed's ZeRO-3 universal path hard-codes fp32/exp_avg/exp_avg_sq and would "
                          "drop z). Resume it at its original world size; `python -m sharded_msam_sf.export` gives "
                          "its x weights")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:8]}")
    work.mkdir()
    try:
        main_out, z_out, stage = work / "universal", work / "z", work / "staged"
        _converter(path, main_out, workers)
        _stage_z(path, optim, stage)
        _converter(stage, z_out, workers)
        zero = main_out / "zero"
        moved = 0
        for folder in sorted((z_out / "zero").iterdir()):
            src = folder / "exp_avg.pt"
            if folder.is_dir() and src.is_file():
                if not (zero / folder.name).is_dir():
                    raise ExportError(f"the two conversions of {path} disagree on the param '{folder.name}'")
                os.replace(src, zero / folder.name / "z.pt")
                moved += 1
        if not moved:
            raise ExportError(f"{path}: DeepSpeed's converter wrote no optimizer state: saved without it?")
        _refuse_zero3_targets(main_out)
        replace_dir(main_out, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sharded_msam_sf.checkpoint", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    u = sub.add_parser("to-universal", help="a DeepSpeed ZeRO checkpoint into DeepSpeed's universal format, with z")
    u.add_argument("ckpt")
    u.add_argument("out")
    u.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        out = to_universal(args.ckpt, args.out, args.workers)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"universal checkpoint: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
