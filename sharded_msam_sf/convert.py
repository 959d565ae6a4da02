"""``python -m sharded_msam_sf.checkpoint convert SRC DST --to {dcp,state_dict}``: portable checkpoints
(:mod:`sharded_msam_sf.portable`) between their containers.

Sources: a portable ``safetensors`` file, a portable DCP directory (written by
:func:`~sharded_msam_sf.portable.save_dcp` from any torch engine and world size), a directory that holds
exactly one of these, or a DeepSpeed ZeRO-1/2/3 checkpoint of any world size (a tag directory with
``*_optim_states.pt``: converted first with :func:`sharded_msam_sf.checkpoint.to_universal` into a
temporary directory, then read by :func:`from_universal`), or such a universal checkpoint itself. Targets: ``state_dict`` (DST/``portable.safetensors``, one file) or ``dcp`` (DST, a DCP
directory). The tool writes into a new directory only: DST must not exist, and must be neither SRC nor
inside nor above it; everything is written under a temporary sibling name and renamed at the end, so a
failure (a foreign or truncated source, a check that fails) leaves nothing behind. Conversion is
deterministic: a checkpoint converted twice is byte-identical to one converted once (tested).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable, Optional

from .portable import Portable, PortableError, _jsonable, _to_y, is_portable_dcp, is_portable_file, load_dcp, \
    load_file, save_dcp, save_file

__all__ = ["convert", "read_any", "from_universal", "add_subcommand", "TARGETS", "FILE_NAME"]

TARGETS = ("dcp", "state_dict")
FILE_NAME = "portable.safetensors"


def from_universal(path: Path) -> Portable:
    """The portable checkpoint of a DeepSpeed universal checkpoint with z (``to-universal``'s output): per
    param folder ``zero/<fqn>/{fp32,z,exp_avg_sq,exp_avg}.pt`` (full tensors), the param groups from
    ``zero/optimizer_state.pt``, the group membership (fqns in order) from ``param_shapes`` and the
    buffers from ``module`` of ``mp_rank_00_model_states.pt``. The fp32 masters are the params in the
    saved mode; they are stored as y like every portable checkpoint."""
    from .deepspeed.universal import UniversalCheckpointError, _check, _load
    path = Path(path)
    try:
        model_sd = _load(path / "mp_rank_00_model_states.pt")
        shapes = model_sd.get("param_shapes")
        if not isinstance(shapes, list):
            raise PortableError(f"{path}: mp_rank_00_model_states.pt has no param_shapes: not a DeepSpeed checkpoint")
        names = [n for g in shapes for n in g]
        gsd = _check(path, names)
    except UniversalCheckpointError as e:
        raise PortableError(str(e)) from None
    if len(gsd["param_groups"]) != len(shapes):
        raise PortableError(f"{path}: {len(gsd['param_groups'])} param groups but {len(shapes)} groups of names")

    def read(folder: Path, key: str):
        f = folder / f"{key}.pt"
        if not f.is_file():
            return None
        t = _load(f)
        return t["param"] if isinstance(t, dict) else t

    tensors, groups = {}, []
    for g, shp in zip(gsd["param_groups"], shapes):
        if "sam_mode" not in g or "weight_sum" not in g:
            raise PortableError(f"{path}: the param groups are not AdamWMSAMScheduleFree's (keys {sorted(g)[:8]}...)")
        gnames = list(shp)
        for n in gnames:
            folder = path / "zero" / n
            fp32 = read(folder, "fp32")
            st = {key: t for key, t in (("z", read(folder, "z")), ("exp_avg_sq", read(folder, "exp_avg_sq")),
                                        ("exp_avg", read(folder, "exp_avg"))) if t is not None}
            shape = tuple(shp[n])
            st = {k: v.reshape(shape) for k, v in st.items()}
            tensors[f"y/{n}"] = _to_y(fp32.reshape(shape).float(), st, g)
            for kind, key in (("z", "z"), ("v", "exp_avg_sq"), ("m", "exp_avg")):
                if key in st:
                    tensors[f"{kind}/{n}"] = st[key].clone()
        groups.append({k: _jsonable(k, v) for k, v in g.items() if k != "params"} | {"params": gnames})
    for n, t in (model_sd.get("module") or {}).items():
        if n not in names and hasattr(t, "shape"):
            tensors[f"buffer/{n}"] = t.clone()
    out = Portable(tensors, groups)
    out.check(str(path))
    return out


def _deepspeed_kind(src: Path) -> str:
    if (src / "zero" / "optimizer_state.pt").is_file() and (src / "mp_rank_00_model_states.pt").is_file():
        return "universal"
    if any(src.glob("*_optim_states.pt")):
        return "zero"
    return ""


def read_any(src: Path, to_universal: Optional[Callable[[Path, Path], Path]] = None) -> Portable:
    """A portable checkpoint from a file, a DCP directory, a directory holding one of them, or a
    DeepSpeed ZeRO (or universal) checkpoint directory. ``to_universal``: the ZeRO → universal converter
    (:func:`sharded_msam_sf.checkpoint.to_universal`, handed in by the CLI that owns it)."""
    src = Path(src)
    if not src.exists():
        raise PortableError(f"{src}: no such file or directory")
    kind = _deepspeed_kind(src) if src.is_dir() else ""
    if kind == "universal":
        return from_universal(src)
    if kind == "zero":
        import tempfile

        from .export import ExportError
        if to_universal is None:
            raise PortableError(f"{src} is a DeepSpeed ZeRO checkpoint: convert it with `python -m "
                                "sharded_msam_sf.checkpoint convert` (which converts it to universal first)")
        with tempfile.TemporaryDirectory(prefix="portable-universal-") as tmp:
            try:
                uni = to_universal(src, Path(tmp) / "universal")
            except ExportError as e:
                raise PortableError(f"{src}: {e}") from None
            return from_universal(uni)
    if src.is_file():
        return load_file(src)
    if (src / ".metadata").exists():
        return load_dcp(src)
    if (src / FILE_NAME).is_file():
        return load_file(src / FILE_NAME)
    found = [p for p in sorted(src.iterdir()) if is_portable_file(p) or is_portable_dcp(p)]
    if len(found) == 1:
        return read_any(found[0])
    raise PortableError(f"{src}: holds {'no' if not found else len(found)} portable checkpoint(s) "
                        f"({', '.join(p.name for p in found)}); name the one to convert")


def _check_paths(src: Path, dst: Path) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise PortableError(f"DST {dst} is SRC, inside it or above it: write to a new directory elsewhere")
    if dst.exists():
        raise PortableError(f"DST {dst} exists: the converter writes only into a new directory (nothing overwritten)")


def convert(src, dst, to: str, to_universal: Optional[Callable[[Path, Path], Path]] = None) -> Path:
    """Convert SRC into a new directory DST (see the module docstring); returns the path written.
    ``to_universal``: see :func:`read_any` (needed for DeepSpeed ZeRO sources)."""
    if to not in TARGETS:
        raise PortableError(f"--to {to!r}: one of {', '.join(TARGETS)}")
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst)
    p = read_any(src, to_universal)
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = dst.with_name(f".tmp-{dst.name}-{uuid.uuid4().hex[:8]}")
    work.mkdir()
    try:
        if to == "state_dict":
            save_file(p, work / FILE_NAME)
            load_file(work / FILE_NAME)            # read back before it counts
        else:
            save_dcp(p, work)
            load_dcp(work)
        work.rename(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dst / FILE_NAME if to == "state_dict" else dst


def add_subcommand(sub, to_universal: Callable[[Path, Path], Path]) -> None:
    """The ``convert`` subcommand for :mod:`sharded_msam_sf.checkpoint`'s parser (which hands in its
    ``to_universal`` for DeepSpeed ZeRO sources)."""
    c = sub.add_parser("convert", help="a portable optimizer checkpoint into another container (new directory)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", required=True, choices=TARGETS)
    c.set_defaults(run=_run, to_universal=to_universal)


def _run(args) -> int:
    try:
        out = convert(args.src, args.dst, args.to, args.to_universal)
    except PortableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"portable checkpoint ({args.to}): {out}")
    return 0
