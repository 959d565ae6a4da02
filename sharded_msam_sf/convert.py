"""``python -m sharded_msam_sf.checkpoint convert SRC DST --to {dcp,state_dict}``: portable checkpoints
(:mod:`sharded_msam_sf.portable`) between their containers.

Sources: a portable ``safetensors`` file, a portable DCP directory (written by
:func:`~sharded_msam_sf.portable.save_dcp` from any torch engine and world size), or a directory that holds
exactly one of these. Targets: ``state_dict`` (DST/``portable.safetensors``, one file) or ``dcp`` (DST, a DCP
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
from typing import List, Optional

from .portable import Portable, PortableError, is_portable_dcp, is_portable_file, load_dcp, load_file, save_dcp, \
    save_file

__all__ = ["convert", "read_any", "add_subcommand", "TARGETS", "FILE_NAME"]

TARGETS = ("dcp", "state_dict")
FILE_NAME = "portable.safetensors"


def read_any(src: Path) -> Portable:
    """A portable checkpoint from a file, a DCP directory, or a directory holding one of them."""
    src = Path(src)
    if not src.exists():
        raise PortableError(f"{src}: no such file or directory")
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


def convert(src, dst, to: str) -> Path:
    """Convert SRC into a new directory DST (see the module docstring); returns the path written."""
    if to not in TARGETS:
        raise PortableError(f"--to {to!r}: one of {', '.join(TARGETS)}")
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst)
    p = read_any(src)
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


def add_subcommand(sub) -> None:
    """The ``convert`` subcommand for :mod:`sharded_msam_sf.checkpoint`'s parser."""
    c = sub.add_parser("convert", help="a portable optimizer checkpoint into another container (new directory)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", required=True, choices=TARGETS)
    c.set_defaults(run=_run)


def _run(args) -> int:
    try:
        out = convert(args.src, args.dst, args.to)
    except PortableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"portable checkpoint ({args.to}): {out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sharded_msam_sf.convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    add_subcommand(sub)
    args = ap.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
