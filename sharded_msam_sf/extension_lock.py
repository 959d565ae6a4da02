"""Stale build locks in torch's extension cache (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``).

``torch.utils.cpp_extension`` (DeepSpeed's CPU ops, our fused C++ kernel) builds each op under
``<root>/<python tag>/<op>/`` and holds a ``lock`` file there while it builds; every other
process that loads the same op waits until the file is gone. A process killed while it builds
leaves the file behind, and every later start then waits forever with no output. This module
finds such files so that the job and the tests fail at once and name the file to remove.

A lock older than ``SMSF_STALE_LOCK_S`` seconds (default 600; a build here takes 1–3 min) is
taken as stale. ``python -m sharded_msam_sf.extension_lock`` prints the stale locks and exits 1
when there is one (``--all``: every lock, also fresh ones).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import List

DEFAULT_STALE_S = 600.0


def extensions_root() -> Path:
    """Where torch builds its extensions: ``TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``
    (torch's own rule, read without importing torch)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "torch_extensions"


def stale_locks(root: Path | None = None, older_than_s: float | None = None) -> List[Path]:
    """The ``lock`` files under ``root`` (``<root>/<tag>/<op>/lock`` or ``<root>/<op>/lock``) older than
    ``older_than_s`` seconds (default ``SMSF_STALE_LOCK_S`` or 600; 0: every lock)."""
    root = extensions_root() if root is None else Path(root)
    if older_than_s is None:
        older_than_s = float(os.environ.get("SMSF_STALE_LOCK_S", DEFAULT_STALE_S))
    now, found = time.time(), []
    for pattern in ("*/lock", "*/*/lock"):
        for lock in root.glob(pattern):
            try:
                age = now - lock.stat().st_mtime
            except FileNotFoundError:  # the build finished meanwhile
                continue
            if age >= older_than_s:
                found.append(lock)
    return sorted(found)


def message(locks: List[Path]) -> str:
    """What to tell the user about stale locks."""
    names = " ".join(str(p) for p in locks)
    return (f"stale torch extension build lock(s): {names} — a build was killed and every process that loads "
            f"that op (DeepSpeed's CPU ops, the fused optimizer kernel) would wait forever. If no build is running "
            f"(check with `ps`), remove it: rm {names}")


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    locks = stale_locks(older_than_s=0 if "--all" in argv else None)
    if locks:
        print(message(locks), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
