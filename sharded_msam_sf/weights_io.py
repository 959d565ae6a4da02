"""Weight exports as ``safetensors``: the one writer and reader of the live and offline exports.

An export is a directory::

    model.safetensors   the weights (x, the optimizer's eval-mode point), no pickle, memory-mappable
    export.json         {"format": "sharded_msam_sf.weights/1", "weights": "x", "step": ..., ...}
    config.json         only when the checkpoint came from an HF model (its config, copied as saved)
    .sharded_msam_sf-output   the marker: a tool wrote this directory (and may replace it)

Every name of the state dict is stored, tied weights (the GPT's ``lm_head.weight`` = ``wte.weight``)
under each of their names, and in sorted order, so that the file does not depend on how the source held
them. The metadata is in ``export.json`` only: the safetensors header holds ``{"format": "pt"}`` (what
HF expects), as safetensors writes its header's metadata in hash-map order, which would make the bytes
of a file differ from run to run.

The directory is written under a temporary name next to it and renamed into place at the end, so a
crash never leaves half an export (an existing export there is replaced whole). Every export carries the
marker file ``.sharded_msam_sf-output`` (:mod:`sharded_msam_sf.output_dir`): the offline tools replace only
directories that hold it (or an export of an earlier release).

:func:`load_weights` also reads the old ``torch.save`` exports (``model.pt``: ``{"model": ..., "meta":
...}``) with ``weights_only=True`` and a ``DeprecationWarning``.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .output_dir import write_marker

__all__ = ["FORMAT", "WEIGHTS_FILE", "META_FILE", "HF_CONFIG_FILE", "save_weights", "write_safetensors",
           "load_weights", "replace_dir"]

FORMAT = "sharded_msam_sf.weights/1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "export.json"
HF_CONFIG_FILE = "config.json"


def _storable(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Contiguous CPU tensors, each with a storage of its own (safetensors refuses shared storage)."""
    tensors: Dict[str, Tensor] = {}
    seen = set()
    for name, t in sorted(state_dict.items()):  # the file does not depend on the source's key order
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: an export holds tensors only, not {type(t).__name__}")
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        tensors[name] = t
    return tensors


def write_safetensors(state_dict: Dict[str, Tensor], path: Path, meta: dict) -> dict:
    """Write ``state_dict`` to ``path`` as one safetensors file; return the metadata for its
    ``export.json`` (``meta`` plus ``format``)."""
    from safetensors.torch import save_file
    tensors = _storable(state_dict)
    meta = dict(meta, format=FORMAT)
    # one header key only: safetensors keeps the header's metadata in a hash map, whose order (and so the
    # file's bytes) would change from run to run with two keys
    save_file(tensors, str(path), metadata={"format": "pt"})
    return meta


def replace_dir(tmp: Path, dest: Path) -> None:
    """Rename the finished directory ``tmp`` to ``dest``, replacing a previous ``dest`` whole."""
    old = None
    if dest.exists():
        old = dest.with_name(f".old-{dest.name}-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_weights(state_dict: Dict[str, Tensor], out_dir: os.PathLike | str, meta: dict,
                 hf_config: Optional[Path] = None) -> Path:
    """Write an export directory (see the module docstring) at ``out_dir``, atomically; return it.
    ``meta`` should say at least ``weights`` (``"x"``) and ``step``; ``hf_config`` is copied as
    ``config.json`` when given."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(mode=0o700)
    try:
        written = write_safetensors(state_dict, tmp / WEIGHTS_FILE, meta)
        (tmp / META_FILE).write_text(json.dumps(written, indent=1, sort_keys=True) + "\n")
        if hf_config is not None:
            shutil.copyfile(hf_config, tmp / HF_CONFIG_FILE)
        write_marker(tmp, "sharded_msam_sf export")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_weights(path: os.PathLike | str) -> Tuple[Dict[str, Tensor], dict]:
    """``(state_dict, meta)`` of an export: its directory, its ``model.safetensors``, or an old ``.pt``
    export (read with ``weights_only=True``; deprecated)."""
    p = Path(path)
    if p.is_dir():
        if (p / WEIGHTS_FILE).is_file():
            p = p / WEIGHTS_FILE
        elif (p / "model.pt").is_file():
            p = p / "model.pt"
        else:
            raise FileNotFoundError(f"{p} holds no {WEIGHTS_FILE} (nor an old model.pt export)")
    if p.suffix == ".pt":
        warnings.warn(f"{p} is an old torch.save export; exports are now {WEIGHTS_FILE} (safetensors). "
                      "Reading it with weights_only=True", DeprecationWarning, stacklevel=2)
        obj = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
            return obj["model"], dict(obj.get("meta") or {})
        return obj, {}
    from safetensors.torch import load_file
    sd = load_file(str(p), device="cpu")
    meta_file = p.parent / META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return sd, meta


DEEPSPEED_README = "README-weights.md"


def write_deepspeed_readme(ckpt_dir: Path) -> Path:
    """Write the note that DeepSpeed's ``zero_to_fp32.py`` gives the training point, not x, into a
    DeepSpeed checkpoint directory (the main job does, for every DeepSpeed checkpoint)."""
    path = Path(ckpt_dir) / DEEPSPEED_README
    name = Path(ckpt_dir).name.removeprefix(".tmp-")  # the main job saves under a temporary name, then renames
    path.write_text(
        "# Weights in this checkpoint: NOT the weights to ship\n\n"
        "This DeepSpeed checkpoint was written by AdamWMSAMScheduleFree (sharded_msam_sf) in train mode. Its fp32\n"
        "masters hold the training point y (in one_pass plus the ascent s*m), not x, the averaged weights that the\n"
        "optimizer evaluates and that are meant for inference. DeepSpeed's `zero_to_fp32.py` (and\n"
        "`get_fp32_state_dict_from_zero_checkpoint`) recover those masters, so they give the training point, with\n"
        "no warning. To get x:\n\n"
        f"    python -m sharded_msam_sf.export {name} --out EXPORT_DIR\n\n"
        "(run next to this directory; it needs no GPU and no process group, verifies the checkpoint's manifest\n"
        "first, and writes EXPORT_DIR/model.safetensors). See docs/checkpoints.md.\n")
    return path
