"""The configs shipped inside the package: ``sharded_msam_sf/configs/{job,deepspeed}/*.json``.

The repository's ``configs/`` is a symlink to this folder (one set of files, in a clone and in
a wheel). ``--config`` of the main job takes either a path or a shipped name:

* ``default`` or ``job/default`` → ``configs/job/default.json`` (job names are the default kind),
* ``deepspeed/zero2-cpu`` → ``configs/deepspeed/zero2-cpu.json`` (a DeepSpeed JSON config),
* a name that is a job config and a DeepSpeed config at once (``zero3-cpu``) means the job's.

A path that exists always wins over a name (``./default`` if there is such a file).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Type

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
KINDS = ("job", "deepspeed")


def shipped(kind: str = "job") -> Dict[str, Path]:
    """{name: path} of the shipped configs of one kind ("job" or "deepspeed"), sorted by name."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {p.stem: p for p in sorted((CONFIG_DIR / kind).glob("*.json"))}


def list_text() -> str:
    """The shipped configs, one per line, for --list-configs."""
    lines: List[str] = []
    for kind in KINDS:
        lines.append(f"{kind} configs ({CONFIG_DIR / kind}):")
        prefix = "" if kind == "job" else f"{kind}/"
        lines += [f"  {prefix}{name}" for name in shipped(kind)]
    return "\n".join(lines)


def resolve(name_or_path: str | os.PathLike, kind: str = "job", error: Type[Exception] = FileNotFoundError) -> Path:
    """The file for ``name_or_path``: an existing path as given, else the shipped config of that name
    (``default``, ``job/default``, ``deepspeed/zero2-cpu``, with or without ``.json``); raises ``error``
    naming the shipped names when it is neither."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    text = str(name_or_path)
    stem = text[:-5] if text.endswith(".json") else text
    head, _, tail = stem.rpartition("/")
    if head.startswith("configs/"):  # a repo-relative path given outside the repository
        head = head[len("configs/"):]
    if head in KINDS:
        kind, stem = head, tail
    elif head:
        stem = ""  # a path in a folder that is not ours: not a name
    found = shipped(kind).get(stem)
    if found is not None:
        return found
    names = ", ".join(shipped("job"))
    raise error(f"config file not found: {text} (not a file, and not a shipped config name: job configs "
                f"{names}; DeepSpeed configs deepspeed/<name>; see --list-configs)")
