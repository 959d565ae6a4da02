"""The verifiable part of a checkpoint of the main job: its manifest (size and SHA-256 of every file),
``job_state.json``, the ownership rules, and the atomic writes they rely on. No process group, nothing
unpickled: used by the job (job/checkpoint.py) and by the sealing of checkpoints of earlier releases
(job/sealing.py). See job/checkpoint.py's docstring for the trust boundary."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

STATE_FILE = "job_state.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "sharded_msam_sf.checkpoint/1"

class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, foreign, or of another run or config."""


class RunDirError(RuntimeError):
    """out_dir cannot be used: writable by other users, locked by another job, or holding another run."""

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _no_space(e: OSError, path: Path) -> OSError:
    if e.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, f"no space left on device while writing {path}", str(path))
    return e


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _no_space(e, path) from e
    _fsync_dir(path.parent)

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

def _private_group(gid: int) -> bool:
    """The user's own group (a user-private group: same name as the user, no other members)."""
    import grp
    import pwd
    try:
        name = pwd.getpwuid(os.geteuid()).pw_name
        g = grp.getgrgid(gid)
    except KeyError:
        return False
    return g.gr_name == name and set(g.gr_mem) <= {name}


def check_private(path: Path, what: str) -> None:
    """path exists, is not a symlink, belongs to this user and only this user can write it."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise RunDirError(f"{what} {path} is a symlink; refusing to follow it")
    if st.st_uid != os.geteuid():
        raise RunDirError(f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}); "
                          "a checkpoint directory is code (DCP/DeepSpeed files are pickles), so only your own "
                          "directories are used")
    if st.st_mode & stat.S_IWOTH:
        raise RunDirError(f"{what} {path} is writable by every user (mode {stat.filemode(st.st_mode)}); "
                          f"a checkpoint directory is code (DCP/DeepSpeed files are pickles): chmod o-w {path}")
    if st.st_mode & stat.S_IWGRP and not _private_group(st.st_gid):
        raise RunDirError(f"{what} {path} is writable by group {st.st_gid} (mode {stat.filemode(st.st_mode)}); "
                          f"a checkpoint directory is code (DCP/DeepSpeed files are pickles): chmod g-w {path}")

def _listing(root: Path) -> tuple[list[str], list[str]]:
    """(relative paths of the regular files under root, problems: symlinks and special files)."""
    files, problems = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                problems.append(f"{p} is a symlink")
            elif name in filenames and not stat.S_ISREG(st.st_mode):
                problems.append(f"{p} is not a regular file")
            elif name in filenames:
                files.append(rel)
    return sorted(files), problems


def _hash_share(root: Path, files: list[str], rank: int, world: int) -> dict:
    return {rel: {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
            for rel in files[rank::world]}


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} {path} is corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} is corrupt (not a JSON object)")
    return data


def read_manifest(ckpt: Path) -> dict:
    m = read_json(ckpt / MANIFEST, "checkpoint manifest")
    if m.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"checkpoint manifest {ckpt / MANIFEST} has format {m.get('format')!r}, "
                              f"expected {MANIFEST_FORMAT!r}")
    for key, tp in (("run_id", str), ("step", int), ("engine", str), ("world_size", int), ("files", dict)):
        if not isinstance(m.get(key), tp) or isinstance(m.get(key), bool):
            raise CheckpointError(f"checkpoint manifest {ckpt / MANIFEST} has no valid '{key}'")
    return m


def _run_of(ckpt: Path) -> str | None:
    try:
        return read_manifest(ckpt)["run_id"]
    except CheckpointError:
        return None


def read_state(ckpt: Path) -> dict:
    """job_state.json of a checkpoint, checked for the keys the loop needs."""
    state = read_json(Path(ckpt) / STATE_FILE, "checkpoint state")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint state {Path(ckpt) / STATE_FILE} has no valid 'step' "
                              f"(got {step!r}); it is corrupt or not written by this job")
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"checkpoint state {Path(ckpt) / STATE_FILE} has no 'config'; it is corrupt "
                              "or not written by this job")
    return state


def verify_share(ckpt: Path, rank: int = 0, world: int = 1, engine: str | None = None) -> list[str]:
    """The problems of checkpoint `ckpt` (empty: it verifies). Every rank checks the structure and the
    manifest; the files' SHA-256 are shared out over the ranks. Nothing is unpickled."""
    ckpt = Path(ckpt)
    try:
        check_private(ckpt, "checkpoint")
        if not (ckpt / MANIFEST).is_file():
            return [f"{ckpt} has no {MANIFEST} (written by an earlier release, or by hand); an unverified checkpoint "
                    "is never loaded: DCP/DeepSpeed files are pickles. Seal it with `python -m "
                    f"sharded_msam_sf.checkpoint seal {ckpt}` (it checks that every file loads with safe loaders "
                    "first), or relaunch with --override checkpoint.adopt_unsealed=true"]
        check_private(ckpt / MANIFEST, "checkpoint manifest")
        m = read_manifest(ckpt)
        state = read_state(ckpt)
    except (CheckpointError, RunDirError, OSError) as e:
        return [str(e)]
    problems = []
    if engine is not None and m["engine"] != engine:
        problems.append(f"{ckpt} is a checkpoint of engine '{m['engine']}', and this run uses '{engine}'; "
                        "checkpoints do not convert between engines (use the same engine.name, or start a new "
                        "run in another log.out_dir)")
    if state["step"] != m["step"] or ckpt.name.startswith("step_") and ckpt.name != f"step_{m['step']:06d}":
        problems.append(f"{ckpt / STATE_FILE} says step {state['step']}, {MANIFEST} says step {m['step']}: "
                        "files from two checkpoints were mixed")
    files, special = _listing(ckpt)
    problems += special
    listed = m["files"]
    for rel in files:
        if rel != MANIFEST and rel not in listed:
            problems.append(f"{ckpt / rel} is not in the manifest (a file added after the save is never loaded)")
    for rel in listed:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{ckpt / MANIFEST} lists a path outside the checkpoint: {rel}")
        elif rel not in files:
            problems.append(f"{ckpt / rel} is missing (listed in the manifest)")
    if problems:
        return problems
    for rel in sorted(listed)[rank::world]:
        want = listed[rel]
        size = (ckpt / rel).stat().st_size
        if size != want.get("size"):
            problems.append(f"{ckpt / rel} has {size} bytes, the manifest says {want.get('size')} "
                            "(truncated or overwritten)")
        elif sha256_file(ckpt / rel) != want.get("sha256"):
            problems.append(f"{ckpt / rel} does not match its SHA-256 in the manifest (corrupt)")
    return problems
