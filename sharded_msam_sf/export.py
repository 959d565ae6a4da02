"""x, the weights to ship, from any checkpoint, offline: ``python -m sharded_msam_sf.export CKPT --out DIR``.

Schedule-Free keeps three sequences; a checkpoint saved in train mode holds y in its params (plus the
ascent ``s·m`` in one_pass, ``at_ascent``), and z, m in the optimizer state. x is what
``optimizer.eval()`` computes, with the same ops in the same order (so the result equals the live
export bit for bit)::

    p = y (+ s·m)           the saved param (or fp32 master)
    p = p + (−s)·m          only if the group is at its ascent (at_ascent)
    x = lerp(p, z, 1 − 1/β1) = (p − (1 − β1)·z)/β1        only if the group is in train mode

per param group, with that group's β1 and ascent scale s. A checkpoint saved in eval mode holds x already.

Reads, on one CPU process, without a process group and without the model's code:

- a DeepSpeed ZeRO-1/2/3 checkpoint of any world size (``*_optim_states.pt`` + ``*_model_states.pt``):
  x is computed on each rank's flat fp32 partition (as the live job does), then DeepSpeed's own
  ``zero_to_fp32`` merge functions put the partitions together;
- a DCP checkpoint (the main job's DDP-free FSDP1/FSDP2 checkpoints: ``.metadata``), read param by param;
- a single-process ``{"model": state_dict, "optimizer": optimizer.state_dict()}`` file (the main job's
  DDP ``state.pt``).

Peak memory: one full copy of the weights (the x being built) plus one shard (DeepSpeed: one rank's
optimizer file, memory-mapped; DCP: one param's y, z, m). Nothing in a checkpoint can run code, manifest or
not (:mod:`sharded_msam_sf.safe_load`): torch files are read with ``torch.load(weights_only=True)`` (DeepSpeed's
few classes allow-listed), DCP's ``.metadata`` with an unpickler that admits only torch's DCP metadata classes,
and DCP's non-tensor items with ``weights_only=True``; a checkpoint of the main job
(``manifest.json``) is verified against its SHA-256 manifest before anything is read. The output is a
``sharded_msam_sf.weights_io`` export directory (``model.safetensors``, ``export.json``, and the HF
``config.json`` when one was saved with the checkpoint), written atomically.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .deepspeed.universal import deepspeed_safe_globals
from .kernels import eager
from .output_dir import OutputDirError, check_output, interruptible
from .weights_io import HF_CONFIG_FILE, save_weights

__all__ = ["ExportError", "x_from", "read_x", "export", "main"]

_OUR_KEYS = ("z", "exp_avg_sq")


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported (the message names the file and what is wrong)."""


# ------------------------------------------------------------------ the math
@torch.no_grad()
def x_from(p: Tensor, z: Tensor, m: Optional[Tensor], group: Dict[str, Any]) -> Tensor:
    """x from a saved param ``p`` (y, plus s·m at the ascent), its ``z`` and momentum ``m``, and the
    saved ``group``: the ops of ``optimizer.eval()`` on a copy (``p`` itself is not changed)."""
    x = p.detach().clone()
    if not group.get("train_mode", False):
        return x
    if group.get("at_ascent", False):
        if m is None:
            raise ExportError("the group is at its ascent but the checkpoint holds no momentum (exp_avg)")
        eager.add_scaled_([x], [m], -float(group["ascent_scale"]), foreach=False)
    eager.swap_y_x_([x], [z], 1.0 - 1.0 / group["betas"][0], foreach=False)
    return x


def _check_group(group: Any, where: str) -> None:
    if not isinstance(group, dict) or "train_mode" not in group or "betas" not in group:
        raise ExportError(f"{where}: this is not a checkpoint of AdamWMSAMScheduleFree (its param groups have no "
                          "'train_mode'/'betas'); a checkpoint of another optimizer holds no x to export")


def _check_state(state: Any, where: str) -> None:
    if not isinstance(state, dict) or any(k not in state for k in _OUR_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ExportError(f"{where}: the optimizer state has {found}, not AdamWMSAMScheduleFree's "
                          "('z', 'exp_avg_sq', 'exp_avg'): a checkpoint of another optimizer")


# ------------------------------------------------------------------ safe loading
def load_file(path: Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's checkpoint classes allow-listed; a clear error
    naming the file when it is missing, truncated, corrupt or holds code."""
    if not path.is_file():
        raise ExportError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # RuntimeError / UnpicklingError / EOFError for bad files
        raise ExportError(f"cannot read checkpoint file {path} ({type(e).__name__}: {str(e)[:300]}); the file is "
                          "truncated, corrupt or not a weights-only torch checkpoint") from e


def _progress(it, total: int, desc: str, quiet: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with DeepSpeed and HF
        return it
    return tqdm(it, total=total, desc=desc, disable=quiet or total < 2, file=sys.stderr, leave=False)


# ------------------------------------------------------------------ the kinds of checkpoints
def _natural(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def resolve(ckpt: Path) -> Path:
    """The checkpoint directory: ``ckpt`` itself, or the one a ``latest`` file in it names (the main job's
    ``checkpoints/`` or a DeepSpeed save dir)."""
    if ckpt.is_dir() and (ckpt / "latest").is_file() and not any(ckpt.glob("*_optim_states.pt")):
        tag = (ckpt / "latest").read_text().strip()
        if not tag or "/" in tag or tag in (".", ".."):
            raise ExportError(f"{ckpt / 'latest'} does not name a checkpoint ({tag!r})")
        return ckpt / tag
    return ckpt


def found(ckpt: Path) -> str:
    """What ``ckpt`` is, in words (for errors that say what was found instead of what was wanted)."""
    if not ckpt.exists():
        return "nothing: the path does not exist"
    if ckpt.is_file():
        return f"a file ({ckpt.stat().st_size} bytes)"
    if (ckpt / "zero").is_dir() and any((ckpt / "zero").glob("*/fp32.pt")):
        return ("a DeepSpeed universal checkpoint (written by to-universal or ds_to_universal.py); it is an output "
                "of the conversion, not an input: use the checkpoint it was converted from")
    if any(ckpt.glob("*_optim_states.pt")) or any(ckpt.glob("*model_states.pt")):
        return "a DeepSpeed ZeRO checkpoint"
    if (ckpt / ".metadata").is_file():
        return ("a DCP checkpoint (the job's FSDP1/FSDP2 engines); the job resumes it at any world size itself, "
                "and `python -m sharded_msam_sf.export` reads it")
    if (ckpt / "state.pt").is_file():
        return ("a DDP / single-process checkpoint (state.pt); it is not partitioned, so it resumes at any world "
                "size, and `python -m sharded_msam_sf.export` reads it")
    if any(ckpt.glob("step_*")) or any(ckpt.glob("global_step*")):
        return "a directory of checkpoints without a `latest` file: name one of its step directories"
    names = sorted(p.name for p in ckpt.iterdir())[:6]
    return f"a directory holding {names or 'nothing'}"


def kind_of(ckpt: Path) -> str:
    if ckpt.is_file():
        return "torch"
    if not ckpt.is_dir():
        raise ExportError(f"checkpoint not found: {ckpt}")
    if (ckpt / "zero").is_dir() and any((ckpt / "zero").glob("*/fp32.pt")):
        raise ExportError(f"{ckpt} is {found(ckpt)}")
    if any(ckpt.glob("*_optim_states.pt")) or any(ckpt.glob("*model_states.pt")):
        return "deepspeed"
    if (ckpt / ".metadata").is_file():
        return "dcp"
    if (ckpt / "state.pt").is_file():
        return "torch"
    raise ExportError(f"{ckpt} is not a checkpoint this tool reads (no DeepSpeed '*_optim_states.pt', no DCP "
                      f"'.metadata', no 'state.pt'): found {found(ckpt)}")


def verify_manifest(ckpt: Path) -> Optional[dict]:
    """Verify a main-job checkpoint against its manifest (SHA-256 of every file); return its
    job_state.json (None for a checkpoint without a manifest, which is read as it is)."""
    if not (ckpt / "manifest.json").is_file():
        return None
    from .job.checkpoint import read_state, verify_share
    problems = verify_share(ckpt)
    if problems:
        raise ExportError("the checkpoint does not verify against its manifest:\n  " + "\n  ".join(problems))
    return read_state(ckpt)


# DeepSpeed ------------------------------------------------------------------
def _ds_files(ckpt: Path) -> Tuple[List[Path], List[Path]]:
    optim = sorted(ckpt.glob("*_optim_states.pt"), key=_natural)
    model = sorted(ckpt.glob("*_model_states.pt"), key=_natural)
    what = found(ckpt)
    if not optim and not what.startswith("a DeepSpeed ZeRO"):
        raise ExportError(f"{ckpt} is not a DeepSpeed ZeRO checkpoint (no '*_optim_states.pt'): found {what}")
    if not optim:
        raise ExportError(f"{ckpt} holds no '*_optim_states.pt': a DeepSpeed checkpoint saved without its optimizer "
                          "state has no z, so x cannot be computed")
    if not model:
        raise ExportError(f"{ckpt} holds no '*_model_states.pt'")
    ranks = []
    for f in optim:
        r = re.search(r"zero_pp_rank_(\d+)_", f.name)
        ranks.append(int(r.group(1)) if r else -1)
    missing = sorted(set(range(max(ranks) + 1)) - set(ranks)) if ranks else []
    if missing:
        raise ExportError(f"{ckpt}: the optimizer file of rank(s) {missing} is missing "
                          f"(zero_pp_rank_{missing[0]}_mp_rank_00_optim_states.pt)")
    return optim, model


def _parse_model_states(files: List[Path]):
    """zero_to_fp32's ``parse_model_states``, reading with weights_only=True; and the saved step."""
    from deepspeed.utils import zero_to_fp32 as z2f
    out, step = [], None
    for f in files:
        sd = load_file(f)
        if not isinstance(sd, dict) or "buffer_names" not in sd or "param_shapes" not in sd:
            raise ExportError(f"{f} is not a DeepSpeed model state file")
        buffers = {k: v.float() if v.is_floating_point() else v for k, v in sd["module"].items()
                   if k in sd["buffer_names"]}
        step = sd.get("global_steps", step)
        shared = sd.get("shared_params") or {}
        shared = [[k, v] for k, v in shared.items()] if isinstance(shared, dict) else []
        out.append(z2f.zero_model_state(buffers=buffers, param_shapes=sd["param_shapes"], shared_params=shared,
                                        ds_version=sd.get("ds_version"),
                                        frozen_param_shapes=sd.get("frozen_param_shapes") or None,
                                        frozen_param_fragments=sd.get("frozen_param_fragments") or None))
    return out, step


def _ds_x_partitions(f: Path) -> Tuple[int, int, List[Tensor], Optional[list]]:
    """(stage, world size, x of each flat group, alignment paddings) of one rank's optimizer file."""
    sd = load_file(f, mmap=True)
    osd = sd.get("optimizer_state_dict") if isinstance(sd, dict) else None
    if not isinstance(osd, dict) or "zero_stage" not in osd:
        raise ExportError(f"{f} is not a DeepSpeed ZeRO optimizer file (no optimizer_state_dict.zero_stage)")
    stage = int(osd["zero_stage"])
    key, inner = (("single_partition_of_fp32_groups", "base_optimizer_state") if stage <= 2
                  else ("fp32_flat_groups", "optimizer_state_dict"))
    base = osd.get(inner)
    if not isinstance(base, dict) or "param_groups" not in base:
        raise ExportError(f"{f} holds no optimizer state ('{inner}'): saved without it, x cannot be computed")
    world = osd["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    flats = osd[key]
    if len(base["param_groups"]) != len(flats):
        raise ExportError(f"{f}: {len(flats)} fp32 groups but {len(base['param_groups'])} optimizer groups")
    xs = []
    for i, (flat, group) in enumerate(zip(flats, base["param_groups"])):
        _check_group(group, str(f))
        state = base["state"].get(i, base["state"].get(str(i)))
        _check_state(state, f"{f} (group {i})")
        z, m = state["z"], state.get("exp_avg")
        # ZeRO-1/2 save the fp32 partition without its alignment padding (at the end of the last rank's
        # partition), and the optimizer state (a rigid checkpoint) with it
        pad = (osd.get("group_paddings") or [0] * len(flats))[i] if stage <= 2 else 0
        if z.dim() == 1 and flat.dim() == 1 and z.numel() == flat.numel() + pad and pad:
            z, m = z[:flat.numel()], (m[:flat.numel()] if m is not None else None)
        if z.shape != flat.shape:
            raise ExportError(f"{f} (group {i}): z has shape {tuple(z.shape)}, the fp32 partition "
                              f"{tuple(flat.shape)}: the file is corrupt or mixed from two checkpoints")
        xs.append(x_from(flat.float(), z, m, group))
    return stage, world, xs, osd.get("param_alignment_paddings")


def read_deepspeed(ckpt: Path, meta: dict, quiet: bool = False) -> Dict[str, Tensor]:
    from deepspeed.utils import zero_to_fp32 as z2f
    optim, model = _ds_files(ckpt)
    states, meta["step"] = _parse_model_states(model)
    flats, stage, world, paddings = [], None, None, None
    for f in _progress(optim, len(optim), "x of each rank's partition", quiet):
        s, w, xs, pad = _ds_x_partitions(f)
        if stage is None:
            stage, world, paddings = s, w, pad
        elif (s, w) != (stage, world):
            raise ExportError(f"{f} is of ZeRO stage {s} with {w} ranks, {optim[0]} of stage {stage} with "
                              f"{world}: files from two checkpoints")
        flats.append(xs)
    if world != len(optim):
        raise ExportError(f"{ckpt}: the optimizer files say {world} ranks, {len(optim)} files found: a rank's file "
                          "is missing (or files from two checkpoints were mixed)")
    with contextlib.redirect_stdout(sys.stderr):
        try:
            if stage <= 2:
                sd = z2f._get_fp32_state_dict_from_zero2_checkpoint(world, flats, states, False, paddings)
            else:
                sd = z2f._get_fp32_state_dict_from_zero3_checkpoint(world, flats, states, False)
                sd = z2f.to_torch_tensor(sd)
        except (ValueError, RuntimeError, AssertionError) as e:
            raise ExportError(f"{ckpt}: the partitions do not add up to the model's params ({e}); "
                              "files from two checkpoints, or a mismatched model state file") from e
    return dict(sd)


# DCP ------------------------------------------------------------------------
def read_dcp(ckpt: Path, meta: dict, quiet: bool = False) -> Dict[str, Tensor]:
    """x from a DCP checkpoint of the main job (flattened optimizer state dict:
    ``optimizer.state.<fqn>.<key>``, ``optimizer.param_groups.<fqn>.<key>``), one param at a time."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from .safe_load import SafeFileSystemReader, SafeLoadPlanner, UnsafeCheckpoint
    reader = SafeFileSystemReader(ckpt)  # .metadata: torch's DCP metadata classes only; items: weights_only
    try:
        meta = reader.read_metadata()
    except UnsafeCheckpoint as e:
        raise ExportError(str(e)) from e
    except (Exception, CheckpointException) as e:
        raise ExportError(f"cannot read {ckpt / '.metadata'} ({type(e).__name__}: {e}): truncated or corrupt") from e
    keys = set(meta.state_dict_metadata)
    names = [k[len("model."):] for k in meta.state_dict_metadata if k.startswith("model.")]
    if not names:
        raise ExportError(f"{ckpt / '.metadata'} holds no 'model.*' entries: not a checkpoint of the main job")

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    def load(wanted: set) -> dict:
        """{full DCP key: value} of the keys ``wanted``."""
        out: dict = {}
        try:
            _load_state_dict(out, storage_reader=SafeFileSystemReader(ckpt),
                             planner=SafeLoadPlanner(keys=wanted), no_dist=True)
        except (Exception, CheckpointException) as e:  # (CheckpointException is a BaseException)
            raise ExportError(f"cannot read {sorted(wanted)} from {ckpt} ({type(e).__name__}: {str(e)[:300]}): a "
                              "data file is missing, truncated or corrupt") from e
        return flat(out)

    group_keys = {k for k in keys if k.startswith("optimizer.param_groups.")}
    if not any(k.startswith("optimizer.state.") for k in keys):
        raise ExportError(f"{ckpt} holds no optimizer state: x cannot be computed")
    sd: Dict[str, Tensor] = {}
    ys: Dict[str, Tensor] = {}  # the saved y of the params with state (to tell tied names)
    stateless = []
    for name in _progress(names, len(names), "x of each param", quiet):
        st = f"optimizer.state.{name}."
        gp = f"optimizer.param_groups.{name}."
        gk = {k for k in group_keys if k.startswith(gp)}
        if not any(k.startswith(st) for k in keys):  # a buffer, a tied name, or a param never stepped
            stateless.append(name)
            continue
        present = {k for k in keys if k.startswith(st)}
        for want in _OUR_KEYS:
            if st + want not in present:
                raise ExportError(f"{ckpt}: '{name}' has optimizer state {sorted(k[len(st):] for k in present)}, not "
                                  "AdamWMSAMScheduleFree's ('z', 'exp_avg_sq', 'exp_avg'): a checkpoint of another "
                                  "optimizer")
        want = {f"model.{name}", st + "z"} | ({st + "exp_avg"} & present) | gk
        got = load(want)
        group = {k[len(gp):]: v for k, v in got.items() if k.startswith(gp)}
        _check_group(group, f"{ckpt} ({name})")
        y, z, m = got[f"model.{name}"], got[st + "z"], got.get(st + "exp_avg")
        if tuple(z.shape) != tuple(y.shape):
            raise ExportError(f"{ckpt}: '{name}' has shape {tuple(y.shape)}, its z {tuple(z.shape)}")
        ys[name] = y
        sd[name] = x_from(y, z, m, group)
    for name in stateless:
        # a name with no optimizer state whose saved value is bit for bit the y of a param with state is
        # that param tied under a second name (the GPT's lm_head.weight = wte.weight; DCP stores both)
        t = load({f"model.{name}"})[f"model.{name}"]
        tied = next((o for o, y in ys.items() if y.shape == t.shape and y.dtype == t.dtype and torch.equal(y, t)), None)
        sd[name] = sd[tied] if tied is not None else t
    return {k: sd[k] for k in names}


# single process ---------------------------------------------------------------
def read_torch(path: Path, meta: dict, quiet: bool = False) -> Dict[str, Tensor]:
    """x from ``{"model": state_dict, "optimizer": optimizer.state_dict()}``: the optimizer's params are
    named by its groups' ``param_names`` when saved, else taken to be the model's distinct tensors (tied
    ones once) in state-dict order (as ``model.parameters()`` gives them; checked by shape)."""
    f = path / "state.pt" if path.is_dir() else path
    obj = load_file(f)
    if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("optimizer"), dict)):
        raise ExportError(f"{f} is not a {{'model': state_dict, 'optimizer': optimizer.state_dict()}} checkpoint")
    model, osd = obj["model"], obj["optimizer"]
    if "param_groups" not in osd or "state" not in osd:
        raise ExportError(f"{f}: 'optimizer' is not an optimizer state_dict")
    unique, seen = [], set()
    for name, t in model.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else ("empty", name)
        if key not in seen:
            seen.add(key)
            unique.append(name)
    ids = [i for g in osd["param_groups"] for i in g["params"]]
    if len(ids) != len(unique):
        raise ExportError(f"{f}: the optimizer has {len(ids)} params and the model {len(unique)} distinct tensors; "
                          "a mismatched model (or a model with buffers, which this reader cannot tell apart "
                          "without the model's code)")
    sd = {k: v for k, v in model.items()}
    xs: Dict[str, Tensor] = {}
    order = iter(unique)
    for group in osd["param_groups"]:
        _check_group(group, str(f))
        names = group.get("param_names") or [next(order) for _ in group["params"]]
        for i, name in zip(group["params"], names):
            if name not in model:
                raise ExportError(f"{f}: the optimizer names '{name}', which the model does not hold: a mismatched "
                                  "model")
            state = osd["state"].get(i)
            if state is None:  # never stepped: the param is x
                continue
            _check_state(state, f"{f} ({name})")
            if tuple(state["z"].shape) != tuple(model[name].shape):
                raise ExportError(f"{f}: '{name}' has shape {tuple(model[name].shape)}, its optimizer state "
                                  f"{tuple(state['z'].shape)}: a mismatched model, or an optimizer whose params "
                                  "do not follow the model's order (its param groups hold no 'param_names')")
            xs[name] = x_from(model[name], state["z"], state.get("exp_avg"), group)
    for name, t in model.items():  # tied names get the x of their tensor
        for other in unique:
            if other in xs and (t is model[other] or (t.numel() and t.untyped_storage().data_ptr() ==
                                                      model[other].untyped_storage().data_ptr()
                                                      and t.shape == model[other].shape)):
                sd[name] = xs[other]
                break
    return sd


READERS = {"deepspeed": read_deepspeed, "dcp": read_dcp, "torch": read_torch}


def read_x(ckpt: os.PathLike | str, quiet: bool = True) -> Tuple[Dict[str, Tensor], dict]:
    """``(x state_dict, meta)`` of a checkpoint (see the module docstring)."""
    path = resolve(Path(ckpt))
    kind = kind_of(path)
    job_state = verify_manifest(path) if path.is_dir() else None
    meta: Dict[str, Any] = {"weights": "x"}
    sd = READERS[kind](path, meta, quiet)
    if meta.get("step") is None:
        meta.pop("step", None)
    if job_state is not None:
        meta["step"] = job_state["step"]
        meta["config"] = job_state["config"]
    return sd, meta


def export(ckpt: os.PathLike | str, out: os.PathLike | str, quiet: bool = True) -> Path:
    """Write x of ``ckpt`` as an export directory at ``out`` (atomically); return it. ``out`` must be a new
    directory or an earlier export (:mod:`sharded_msam_sf.output_dir`), and not the checkpoint or around it."""
    path = resolve(Path(ckpt))
    out = check_output(out, (Path(ckpt), path), "export")
    sd, meta = read_x(path, quiet)
    hf = path / HF_CONFIG_FILE if path.is_dir() and (path / HF_CONFIG_FILE).is_file() else None
    if hf is None and path.is_dir() and (path.parent / HF_CONFIG_FILE).is_file():
        hf = path.parent / HF_CONFIG_FILE
    if "step" not in meta and hf is None:
        meta["source"] = path.name
    return save_weights(sd, out, meta, hf_config=hf)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sharded_msam_sf.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", help="a checkpoint directory (DeepSpeed, DCP, the main job's) or a state_dict file")
    ap.add_argument("--out", required=True, help="the export directory to write: a new directory, or an earlier "
                    "export (replaced whole); never the checkpoint, a directory around it, or another directory")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        with interruptible():  # SIGTERM removes the temporary directory too
            out = export(args.ckpt, args.out, quiet=args.quiet)
    except (ExportError, OutputDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:
        from .job.checkpoint import is_full_disk
        if not is_full_disk(e):
            raise
        print(f"error: no space left on device: {Path(args.out).resolve().parent} (writing the export {args.out}; "
              f"{type(e).__name__}: {str(e)[:200]}); nothing was written there", file=sys.stderr)
        return 1
    print(f"x weights: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
