"""``python -m sharded_msam_sf.checkpoint seal DIR [--check]``: the command line of
:mod:`sharded_msam_sf.job.sealing` (checkpoints without ``manifest.json``, those of earlier releases:
checked with the safe loaders, then sealed; ``--check`` writes nothing)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .job.sealing import COMMAND, SealError, seal, seal_checkpoint, step_dirs, unsealed  # noqa: F401

__all__ = ["add_parser", "run", "main", "seal", "SealError", "COMMAND"]


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
