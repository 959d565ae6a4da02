"""Where the offline tools may write: a new directory, or one a tool of this package wrote.

``python -m sharded_msam_sf.export CKPT --out OUT`` and ``python -m sharded_msam_sf.checkpoint
to-universal CKPT OUT`` build their output under a temporary sibling name and then rename it to ``OUT``,
replacing a previous ``OUT`` whole. Replacing is allowed only where nothing can be lost:

- ``OUT`` does not exist, or is an empty directory (not the working directory nor one above it);
- or ``OUT`` holds the marker file :data:`MARKER` that every output of these tools (and the main job's
  ``export/``) carries, or it is an export directory of an earlier release (only ``model.safetensors``,
  ``export.json``, ``config.json``, ``model.pt``);
- and ``OUT`` is neither the input, nor inside it, nor above it (a checkpoint's manifest would break, or
  the input would be replaced), nor a symlink.

Anything else is refused with :class:`OutputDirError` before anything is read or written. The tools
remove only what they created (their temporary directories, also on SIGINT/SIGTERM: see
:func:`interruptible`).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Iterable, Iterator

__all__ = ["MARKER", "OutputDirError", "check_output", "write_marker", "interruptible"]

MARKER = ".sharded_msam_sf-output"
_LEGACY_EXPORT = {"model.safetensors", "export.json", "config.json", "model.pt"}


class OutputDirError(RuntimeError):
    """An output path a tool refuses to write (the message says why and what to do)."""


def _is_ours(out: Path) -> bool:
    names = {p.name for p in out.iterdir()}
    if MARKER in names:
        return True
    return bool(names) and names <= _LEGACY_EXPORT and bool(names & {"export.json", "model.pt"})


def check_output(out: os.PathLike | str, inputs: Iterable[os.PathLike | str], tool: str) -> Path:
    """The absolute path ``out`` may be written as (see the module docstring), or OutputDirError."""
    if str(out).strip() == "":
        raise OutputDirError(f"{tool}: the output path is empty; give a new directory")
    given = Path(out)
    if given.is_symlink():
        raise OutputDirError(f"{tool}: the output {given} is a symlink; give the directory itself (a tool never "
                             "replaces what a link points to)")
    path = given.resolve()
    cwd = Path.cwd().resolve()
    sources = [Path(src).resolve() for src in inputs]
    for src in sources:
        if path == src:
            raise OutputDirError(f"{tool}: the output {given} is the input checkpoint {src}; it would be replaced. "
                                 "Give a new directory")
    for src in sources:
        if src in path.parents:
            raise OutputDirError(f"{tool}: the output {given} is inside the input checkpoint {src}; its manifest "
                                 "would no longer verify. Give a directory outside it")
        if path in src.parents:
            raise OutputDirError(f"{tool}: the output {given} holds the input checkpoint {src}; replacing it would "
                                 "delete the checkpoint. Give a new directory")
    if path == cwd or path in cwd.parents:
        raise OutputDirError(f"{tool}: the output {given} is the working directory (or above it); the output "
                             "directory is replaced whole. Give a new directory, e.g. --out ./export")
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputDirError(f"{tool}: the output {given} exists and is not a directory; give a new directory")
        if any(path.iterdir()) and not _is_ours(path):
            raise OutputDirError(f"{tool}: the output {given} exists and was not written by this tool (no {MARKER} "
                                 "in it); it is replaced whole, so only a new directory or an earlier output of "
                                 "this tool is used. Give a new directory, or remove it yourself")
    return path


def write_marker(directory: Path, tool: str) -> None:
    """The marker that makes ``directory`` replaceable by the next run of a tool."""
    (directory / MARKER).write_text(json.dumps({"written_by": tool, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                "note": "replaced whole by the next run that writes here"}) + "\n")


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM (and SIGINT, as usual) raise in the main thread, so that the tools' ``finally`` blocks remove
    their temporary directories; the exit status is 128 + the signal's number."""
    def _raise(signum, frame):
        raise SystemExit(128 + signum)
    try:
        old = signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
