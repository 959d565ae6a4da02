"""DeepSpeed universal checkpoints with AdamWMSAMScheduleFree's state:
``python -m sharded_msam_sf.checkpoint to-universal CKPT OUT``.

DeepSpeed's converter (``deepspeed.checkpoint.ds_to_universal``) writes one folder per param with
``fp32.pt``, ``exp_avg.pt`` and ``exp_avg_sq.pt`` (the Adam keys are hard-coded) and
``zero/optimizer_state.pt`` with the param groups (where our counters live: ``k``, ``weight_sum``,
``lr_max``, ``train_mode``, ``at_ascent``, ``ascent_scale``, ...). The one thing missing is ``z``.
This runs DeepSpeed's converter twice, the second time on a staging copy whose optimizer files carry
``z`` under the key ``exp_avg``, and moves that run's ``exp_avg.pt`` files in as ``z.pt``: DeepSpeed's
converter, unchanged, does all the slicing and merging (ZeRO-1/2 and ZeRO-3 sources alike).

Sources: ZeRO-1/2/3 checkpoints of any world size, fp32 or bf16 (the fp32 masters are converted).
Targets: ZeRO-1/2/3 at any world size, loaded with
:func:`sharded_msam_sf.deepspeed.universal.load_universal` (the main job does this itself when
it resumes a DeepSpeed checkpoint on another world size or ZeRO stage). ZeRO-1/2 engines may also use
DeepSpeed's own ``"checkpoint": {"load_universal": true}``. DeepSpeed's own ZeRO-3 universal loader
would drop z and the counters of all groups but the first (see ``zero_universal``): the output is
made unloadable by it (no ``optimizer_state_dict`` in ``zero/optimizer_state.pt``, no ZeRO-3
model-state file), so it fails at ``load_checkpoint`` instead of resuming on a wrong trajectory.
The model-state file a ZeRO-1/2 engine reads (``mp_rank_00_model_states.pt``: the step counters) is
written from rank 0's ZeRO-3 file for ZeRO-3 sources.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pickle
import shutil
import sys
import uuid
from pathlib import Path
from typing import List, Optional

import torch

from .export import ExportError, _ds_files, _natural, load_file, resolve, verify_manifest
from .safe_load import UnsafeCheckpoint, weights_only_torch_load
from .output_dir import OutputDirError, check_output, interruptible, write_marker
from .weights_io import replace_dir

__all__ = ["to_universal", "main"]


def _weights_only_in_worker() -> None:
    weights_only_torch_load().__enter__()  # the worker process ends with the conversion


def _converter(src: Path, out: Path, workers: int) -> None:
    """DeepSpeed's converter, with every ``torch.load`` it makes (``weights_only=False`` in DeepSpeed) made
    ``weights_only=True`` (:func:`sharded_msam_sf.safe_load.weights_only_torch_load`), in its worker
    processes too: a planted pickle fails the conversion instead of running."""
    from deepspeed.checkpoint import ds_to_universal as conv
    args = argparse.Namespace(input_folder=str(src), output_folder=str(out), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # universal_checkpoint_info: Megatron's, absent here
    pool = conv.ProcessPoolExecutor
    conv.ProcessPoolExecutor = functools.partial(pool, initializer=_weights_only_in_worker)
    try:
        with contextlib.redirect_stdout(sys.stderr), weights_only_torch_load():
            conv.main(args)
    except UnsafeCheckpoint as e:
        raise ExportError(f"{src}: {e}") from e
    except pickle.UnpicklingError as e:
        raise ExportError(f"{src}: a file does not load with torch.load(weights_only=True) ({str(e)[:300]}): it "
                          "holds code or is corrupt; nothing was run") from e
    finally:
        conv.ProcessPoolExecutor = pool


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


def _shape_zero3_files(out: Path, param_shapes: List[dict]) -> None:
    """DeepSpeed's ZeRO-3 merge saves each state as a bare flat tensor, its ZeRO-1/2 merge as
    ``{"param": tensor of the param's shape}``, which is what the ZeRO-1/2 loader reads (and the ZeRO-3
    one too): rewrite the ZeRO-3 ones so (the shapes from the source's model-state file)."""
    shapes = {name: shape for group in param_shapes for name, shape in group.items()}
    for name, shape in shapes.items():
        for f in (out / "zero" / name).glob("*.pt"):
            t = torch.load(f, map_location="cpu", weights_only=True)
            if torch.is_tensor(t) and t.dim() == 1 and f.stem != "step":
                torch.save({"param": t.view(shape)}, f)


def _fence_deepspeed_zero3_loader(out: Path) -> None:
    """Make the output unloadable by DeepSpeed's own ZeRO-3 universal loader, which would drop z
    (``load_hp_checkpoint_state_from_checkpoint_dir_stage3`` reads only fp32/exp_avg/exp_avg_sq, and
    ``optimizer_state.pt['optimizer_state_dict']``, which the ZeRO-1/2 loader never reads, and finds the
    engine's ``zero_pp_rank_0_mp_rank_*_model_states.pt``, which is removed). A ZeRO-3 source's rank-0
    model-state file becomes ``mp_rank_00_model_states.pt`` (what ZeRO-1/2 engines and our loader read);
    its optimizer file's partitions (``fp32_flat_groups``), copied by the converter, are dropped."""
    zero3 = sorted(out.glob("zero_pp_rank_*_mp_rank_*_model_states.pt"), key=_natural)
    if zero3 and not (out / "mp_rank_00_model_states.pt").exists():
        _shape_zero3_files(out, load_file(zero3[0])["param_shapes"])
        os.replace(zero3[0], out / "mp_rank_00_model_states.pt")
    f = out / "zero" / "optimizer_state.pt"
    sd = load_file(f)  # written just now by DeepSpeed's converter
    if isinstance(sd, dict) and ("optimizer_state_dict" in sd or "fp32_flat_groups" in sd):
        sd.pop("optimizer_state_dict", None)
        sd.pop("fp32_flat_groups", None)
        # ZeRO-1/2's loader asserts on a version, which ZeRO-3 keeps in the model-state file only
        sd.setdefault("ds_version", load_file(out / "mp_rank_00_model_states.pt", mmap=True).get("ds_version"))
        torch.save(sd, f)
    for stale in out.glob("zero_pp_rank_*_model_states.pt"):
        stale.unlink()


def to_universal(ckpt: os.PathLike | str, out: os.PathLike | str, workers: int = 1) -> Path:
    """Convert a DeepSpeed ZeRO-1/2/3 checkpoint (any world size) into DeepSpeed's universal format with ``z``
    (see the module docstring); ``out`` is written under a temporary name and renamed at the end. ``out`` must
    be a new directory or an earlier output of this tool (:mod:`sharded_msam_sf.output_dir`), and not the
    checkpoint or around it."""
    path = resolve(Path(ckpt))
    out = check_output(out, (Path(ckpt), path), "to-universal")
    verify_manifest(path)
    optim, _ = _ds_files(path)
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
        _fence_deepspeed_zero3_loader(main_out)
        write_marker(main_out, "sharded_msam_sf to-universal")
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
    from .convert import add_subcommand
    add_subcommand(sub, to_universal)  # convert: portable checkpoints (sharded_msam_sf.convert)
    from . import checkpoint_seal  # `seal`: checkpoints of earlier releases (its own module)
    checkpoint_seal.add_parser(sub)
    args = ap.parse_args(argv)
    if getattr(args, "run", None) is not None:
        return args.run(args)
    if args.command == "seal":
        return checkpoint_seal.run(args)
    try:
        with interruptible():  # SIGTERM removes the temporary directories too
            out = to_universal(args.ckpt, args.out, args.workers)
    except (ExportError, OutputDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:
        from .job.checkpoint import is_full_disk
        if not is_full_disk(e):
            raise
        print(f"error: no space left on device: {Path(args.out).resolve().parent} (writing the universal checkpoint "
              f"{args.out}; {type(e).__name__}: {str(e)[:200]}); nothing was written there. Free space and run "
              "it again", file=sys.stderr)
        return 1
    print(f"universal checkpoint: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
