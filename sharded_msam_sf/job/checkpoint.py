"""Atomic, verified checkpoints; resume discovery with fallback; the run directory's lock and identity;
preemption signals; the eval-mode weight export.

Layout under `<out_dir>/`:

    .lock                        held (flock) by rank 0 of the job using this out_dir
    checkpoints/step_000100/     a complete checkpoint: the engine's files, job_state.json, manifest.json (last)
    checkpoints/.tmp-step_000200/  a checkpoint being written (never read; removed by the next save)
    checkpoints/latest           the name of the newest complete checkpoint (replaced atomically)

Trust boundary. DCP's `.metadata` and DeepSpeed's `*_model_states.pt`/`*_optim_states.pt` are pickles
(DeepSpeed loads them with weights_only=False), so a checkpoint directory is code. What makes resume
safe: (1) `manifest.json`, written by rank 0 at save, holds the size and SHA-256 of every file of the
checkpoint with the step, engine, world size and run id; before anything is unpickled every file is
checked against it, files it does not list are refused, and symlinks are refused; (2) out_dir, its
`checkpoints/` and each checkpoint directory must belong to this user and not be writable by other
users (not world-writable; group-writable only for the user's private group), and no directory
above out_dir may be world-writable without the sticky bit, so nobody else can replace a file
between verification and load; (3) `latest` must be a plain file naming a checkpoint directly under
`checkpoints/`. Files we load ourselves are read with torch.load(weights_only=True).

Every rank writes its part into the temporary directory; after a barrier the ranks hash the files
(shared out over the ranks), rank 0 writes job_state.json and then manifest.json, renames the
directory into place and only then replaces `latest`. A crash at any point leaves the previous
checkpoint as `latest`. Checkpoints assume a file system shared by all ranks (as DCP and DeepSpeed do).

Runs have an identity (a run id, kept in every manifest and job_state.json). A new run never writes
into a checkpoints/ directory that holds another run's checkpoints (checkpoint.resume=never there is
refused), and pruning removes only this run's checkpoints, never the one `latest` names and never
the newest one whose loss was finite.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

STATE_FILE = "job_state.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "sharded_msam_sf.checkpoint/1"
LOCK_FILE = ".lock"
_STORE_RUN_KEY = "/sharded_msam_sf/run_id"  # in torchrun's agent store, which outlives worker restarts


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, foreign, or of another run or config."""


class RunDirError(RuntimeError):
    """out_dir cannot be used: writable by other users, locked by another job, or holding another run."""


# ------------------------------------------------------------------ collectives that also work without a group
def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _broadcast(obj, src: int = 0):
    """Rank src's object on every rank."""
    if not _dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _all_gather(obj) -> list:
    if not _dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _agree(fn, what: str):
    """Run fn() on every rank; if it raises on any rank, raise the same CheckpointError on every rank
    (so no rank is left waiting in the next collective)."""
    err = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised on every rank below
        err, result = e, None
    errs = _all_gather(None if err is None else _describe_error(err, what))
    bad = [(r, m) for r, m in enumerate(errs) if m]
    if bad:
        msg = bad[0][1] if len(bad) == 1 or all(m == bad[0][1] for _, m in bad) else \
            "; ".join(f"rank {r}: {m}" for r, m in bad)
        raise CheckpointError(msg) from err
    return result


# what torch.save's zip writer says when a write comes up short (a full disk or quota; errno is lost)
_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed writing file", "file write failed")


def is_full_disk(e: BaseException) -> bool:
    """ENOSPC, or torch.save's ``[enforce fail at inline_container.cc:...] . unexpected pos`` (its zip writer
    reports a write that came up short that way, without the errno)."""
    text = str(e)
    return ((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
            or "no space left on device" in text.lower()
            or (isinstance(e, RuntimeError) and any(m in text for m in _SHORT_WRITE)))


def _describe_error(e: BaseException, what: str) -> str:
    """The error text; a full disk says so and names the path."""
    chain, cur = [], e
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for c in chain:
        if is_full_disk(c):
            where = getattr(c, "filename", None) or what
            return f"no space left on device while writing {where} ({type(c).__name__}: {c})"
    return f"{what}: {type(e).__name__}: {e}"


# ------------------------------------------------------------------ files
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


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        if is_full_disk(e):
            raise OSError(errno.ENOSPC, f"no space left on device while writing {path}", str(path)) from e
        raise
    _fsync_dir(path.parent)


def load_torch_file(path: Path, map_location="cpu"):
    """torch.load(weights_only=True) with clear errors for a missing, truncated or foreign file."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError for bad files
        raise CheckpointError(f"cannot read checkpoint file {path} ({type(e).__name__}: {e}); "
                              "the file is truncated, corrupt or not a weights-only torch checkpoint") from e


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ who may write here
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


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """Refuse an out_dir that other users can write to (see the module docstring); call before any
    process group starts. A missing out_dir is fine (it is created private)."""
    out = Path(out_dir).absolute()
    if out.exists():
        check_private(out.resolve(), "log.out_dir")
        ck = out / "checkpoints"
        if ck.exists() or ck.is_symlink():
            check_private(ck, "checkpoint directory")
    start = (out.resolve() if out.exists() else out).parent
    for p in (start, *start.parents):
        try:
            st = p.stat()
        except OSError:
            continue
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise RunDirError(f"{p}, above log.out_dir {out}, is writable by every user without the sticky bit "
                              f"(mode {stat.filemode(st.st_mode)}): anyone could replace the run directory; "
                              "use an out_dir under a directory only you can write to")


def make_private_dir(path: Path) -> None:
    """mkdir -p; directories created here get no group/other write bits whatever the umask."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for p in missing:
        os.chmod(p, os.stat(p).st_mode & ~0o022)


# ------------------------------------------------------------------ the lock
class RunLock:
    """An exclusive flock on `<out_dir>/.lock`, taken by rank 0 of a job and held until that process
    exits (the kernel releases it then, also on SIGKILL). A second job on the same out_dir — or a
    relaunch while orphaned workers of a killed torchrun agent still run — is refused, naming the
    holder. torchrun restarts of the same job get in: torchrun ends the old workers first."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        make_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(
                    f"log.out_dir {self.path.parent} is in use by another job ({holder}); two jobs on one "
                    "out_dir would overwrite each other's checkpoints. Wait for it, stop it (also orphaned "
                    "workers of a killed launcher), or use another log.out_dir") from None
            raise
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def acquire_run_lock(out_dir: Path, rank: int) -> RunLock | None:
    """Rank 0 takes the lock; every rank raises the same RunDirError if it is held."""
    lock, err = None, None
    if rank == 0:
        try:
            lock = RunLock(out_dir)
            lock.acquire()
        except (RunDirError, OSError) as e:
            lock, err = None, str(e)
    err = _broadcast(err)
    if err:
        raise RunDirError(err)
    return lock


# ------------------------------------------------------------------ manifests
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


def verify(ckpt: Path, rank: int = 0, world: int = 1, engine: str | None = None) -> list[str]:
    """Collective: the problems found by all ranks (the same list on every rank)."""
    found = _all_gather(verify_share(ckpt, rank, world, engine))
    return sorted({p for share in found for p in share})


def check_replaceable(final: Path, run_id: str) -> None:
    """Raise CheckpointError unless ``final`` is absent or a checkpoint of run ``run_id`` (sealed: its
    manifest says so); a step directory this run did not write is never removed or overwritten."""
    if final.is_symlink():
        raise CheckpointError(f"{final} is a symlink; the job never writes through a link. Replace it with the "
                              "directory itself, or remove it")
    if final.exists() and _run_of(final) != run_id:
        raise CheckpointError(f"{final} exists and was not written by this run ({run_id}; its manifest says "
                              f"{_run_of(final) or 'nothing: it has none'}); a checkpoint of another run or of an "
                              "earlier release is never overwritten. Move it away, or use a fresh log.out_dir")


def seal(tmp: Path, final: Path, job_state: dict, rank: int, world: int, healthy: bool = True,
         extra: dict | None = None, replace_any: bool = False) -> None:
    """Collective: make the directory ``tmp`` (its files written) the verified checkpoint ``final``: the
    files' SHA-256 (shared out over the ranks), then rank 0 writes job_state.json, manifest.json (last;
    ``extra`` keys added), and renames ``tmp`` to ``final`` (replacing one of the same name only if it is
    this run's, or with ``replace_any``: the job's own derived conversions). A failure raises the same
    CheckpointError on every rank; ``final`` is then as it was."""
    files = _broadcast(_listing(tmp)[0] if rank == 0 else None)
    files = [f for f in files if f not in (STATE_FILE, MANIFEST)]
    share = _agree(lambda: _hash_share(tmp, files, rank, world), f"checkpoint {tmp}")
    listed = {k: v for share in _all_gather(share) for k, v in share.items()}

    def finish():
        if rank != 0:
            return
        if not replace_any:
            check_replaceable(final, job_state["run_id"])
        atomic_write_bytes(tmp / STATE_FILE, json.dumps(job_state, indent=1).encode())
        listed[STATE_FILE] = {"size": (tmp / STATE_FILE).stat().st_size, "sha256": sha256_file(tmp / STATE_FILE)}
        manifest = {"format": MANIFEST_FORMAT, "run_id": job_state["run_id"], "step": job_state["step"],
                    "engine": job_state.get("engine", "?"), "world_size": job_state.get("world_size", world),
                    "healthy": healthy, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": listed,
                    **(extra or {})}
        atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        os.chmod(tmp, 0o755)
        if final.exists():  # re-saving the same step (e.g. a signal right after an interval save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    _agree(finish, f"checkpoint {final}")


# ------------------------------------------------------------------ the checkpointer
class Checkpointer:
    def __init__(self, out_dir: str | os.PathLike, rank: int, keep: int, world: int = 1, run_id: str = ""):
        self.out_dir = Path(out_dir)
        self.root = self.out_dir / "checkpoints"
        self.rank, self.keep, self.world, self.run_id = rank, keep, world, run_id

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:06d}"

    def pointer(self) -> Path | None:
        """The checkpoint `latest` names (None without `latest`); refuses a pointer that leaves out_dir."""
        ptr = self.root / "latest"
        if ptr.is_symlink():
            raise CheckpointError(f"{ptr} is a symlink; the job writes it as a plain file naming a checkpoint "
                                  "under checkpoints/, and does not follow links out of out_dir")
        if not ptr.exists():
            return None
        if not ptr.is_file():
            raise CheckpointError(f"{ptr} is not a file")
        name = ptr.read_text().strip()
        if not name or "/" in name or "\\" in name or name in (".", "..") or not name.startswith("step_"):
            raise CheckpointError(f"{ptr} names {name!r}, which is not a checkpoint directly under {self.root}; "
                                  "refusing a pointer that leaves out_dir")
        return self.root / name

    def complete(self) -> list[Path]:
        """The checkpoints whose save finished (manifest written), oldest first."""
        done = [p for p in self.root.glob("step_*") if p.name[5:].isdigit() and not p.is_symlink()
                and (p / MANIFEST).is_file()]
        return sorted(done, key=lambda p: int(p.name[5:]))

    def candidates(self) -> list[Path]:
        """Checkpoints to try, best first: the one `latest` names, then the others newest first."""
        done = self.complete()[::-1]
        ptr = self.pointer()
        if ptr is not None and ptr in done:
            done.remove(ptr)
            done.insert(0, ptr)
        return done

    def latest(self) -> Path | None:
        """The first candidate (unverified), or None."""
        cands = self.candidates()
        return cands[0] if cands else None

    def has_any(self) -> bool:
        return self.root.is_dir() and any(self.root.glob("step_*"))

    def save(self, engine, step: int, job_state: dict) -> Path:
        """Collective: every rank must call it. A failure (also a full disk) raises the same
        CheckpointError on every rank and leaves `latest` and the earlier checkpoints as they were."""
        final = self.root / self.name(step)
        tmp = self.root / f".tmp-{self.name(step)}"

        def prepare():
            if self.rank == 0:
                check_replaceable(final, self.run_id)
                make_private_dir(self.root)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
        try:
            _agree(prepare, f"checkpoint directory {tmp}")
            _agree(lambda: engine.save(tmp), f"checkpoint {tmp}")
            seal(tmp, final, dict(job_state, step=step, run_id=self.run_id), self.rank, self.world,
                 healthy=bool(job_state.get("healthy", True)))

            def point():
                if self.rank == 0:
                    atomic_write_bytes(self.root / "latest", final.name.encode())
            _agree(point, f"checkpoint {final}")
        except CheckpointError:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.rank == 0:
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        """Keep the newest `keep` checkpoints of this run, and always the newest one whose loss was
        finite; never touch another run's checkpoints."""
        mine = []
        for p in self.complete():
            try:
                m = read_manifest(p)
            except CheckpointError:
                continue
            if m["run_id"] == self.run_id:
                mine.append((p, m))
        keep = {p for p, _ in mine[-self.keep:]}
        healthy = [p for p, m in mine if m.get("healthy", True)]
        if healthy:
            keep.add(healthy[-1])
        ptr = None
        try:
            ptr = self.pointer()
        except CheckpointError:
            pass
        for p, _ in mine:
            if p not in keep and p != ptr:
                shutil.rmtree(p, ignore_errors=True)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def read_state(path: Path) -> dict:
        return read_state(path)


# ------------------------------------------------------------------ choosing the checkpoint to resume
@dataclass
class ResumePlan:
    path: Path | None  # None: a fresh run
    run_id: str
    state: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what rank 0 should tell the user


def _agent_store():
    """torchrun's agent store (it outlives worker restarts), or None when not under torchrun's."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta
    try:
        return dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env.get("WORLD_SIZE", "1")),
                             is_master=False, timeout=timedelta(seconds=60))
    except Exception:  # noqa: BLE001 - no store: restarts then behave like first launches
        return None


def _store_get(store, key: str) -> str | None:
    if store is None:
        return None
    try:
        return store.get(key).decode() if store.check([key]) else None
    except Exception:  # noqa: BLE001
        return None


def plan_resume(cfg, ckpt: Checkpointer) -> ResumePlan:
    """Collective: which checkpoint to resume (verified), and the run id, the same on every rank.

    checkpoint.resume: auto (the newest checkpoint that verifies, falling back to older ones, saying
    so; none: a fresh run), must (the same, but a checkpoint is required), never (a fresh run; refused
    if checkpoints/ holds checkpoints — they belong to another run; a torchrun restart of this run
    continues from its own checkpoints), or a path (that checkpoint, no fallback)."""
    mode = cfg.checkpoint.resume
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    engine = cfg.engine.name
    rank, world = ckpt.rank, ckpt.world
    store = _agent_store() if rank == 0 and (restarted or mode == "never") else None

    def listing():
        own_run = _store_get(store, _STORE_RUN_KEY) if restarted else None
        refusal, adopted = _unsealed_refusal(cfg, ckpt.root)
        if refusal:
            return None, False, None, refusal, []
        if mode not in ("auto", "never", "must"):
            return [str(Path(mode))], False, own_run, None, adopted
        if mode == "never" and own_run is None:
            if ckpt.has_any():
                newest = ckpt.complete()
                desc = ""
                if newest:
                    try:
                        m = read_manifest(newest[-1])
                        desc = f" (run {m['run_id']}, newest step {m['step']})"
                    except CheckpointError:
                        pass
                return None, False, None, (
                    f"checkpoint.resume=never, but {ckpt.root} holds checkpoints of another run{desc}; a new run "
                    "never mixes its checkpoints with another's. Use a fresh log.out_dir, remove that "
                    "directory, or continue it with checkpoint.resume=auto"), []
            return [], False, None, None, adopted
        cands = ckpt.candidates()
        if own_run is None:  # the run is the newest checkpoint's: never fall back into another run's
            own_run = next((r for r in map(_run_of, cands) if r is not None), None)
        return [str(p) for p in cands], True, own_run, None, adopted

    err = None
    listed = None
    if rank == 0:
        try:
            listed = listing()
        except (CheckpointError, RunDirError, OSError) as e:
            err = str(e)
    err, listed = _broadcast((err, listed))
    if err:
        raise CheckpointError(err)
    cands, fallback, own_run, refusal, adopted = listed
    if refusal:
        raise RunDirError(refusal)

    notes, failures = list(adopted), []
    for i, c in enumerate(map(Path, cands)):
        problems = verify(c, rank, world, engine)
        if not problems and own_run is not None:
            run = read_manifest(c)["run_id"]
            if run != own_run:
                problems = [f"{c} belongs to run {run}, not to this run ({own_run})"]
        if not problems and not fallback:  # an explicit path: out_dir must not hold another run's checkpoints
            run = read_manifest(c)["run_id"]
            others = _broadcast(sorted({_run_of(p) for p in ckpt.complete()} - {run, None}) if rank == 0 else None)
            if others:
                raise RunDirError(f"{ckpt.root} holds checkpoints of run(s) {', '.join(others)}, and {c} belongs "
                                  f"to run {run}; a run never mixes its checkpoints with another's. Resume it "
                                  "into a fresh log.out_dir")
        if not problems:
            if failures:
                notes.append(f"resuming from {c}, the newest checkpoint that verifies")
            state = read_state(c)
            return ResumePlan(c, read_manifest(c)["run_id"], state, notes)
        failures.append((c, problems))
        more = " ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        notes.append(f"checkpoint {c} fails verification, not loaded: {more}")
        if not fallback:
            break
        if i + 1 < len(cands):
            notes.append("trying the previous checkpoint")
    if failures:
        raise CheckpointError("no checkpoint to resume verifies:\n  " + "\n  ".join(notes))
    if mode == "must":
        raise CheckpointError(f"--resume: no complete checkpoint under {ckpt.root}")
    run_id = own_run or _broadcast(uuid.uuid4().hex[:12] if rank == 0 else None)
    return ResumePlan(None, run_id, {}, notes)


def _unsealed_refusal(cfg, root: Path) -> tuple[str | None, list[str]]:
    """(a refusal, notes) for step directories under ``root`` that the job cannot use as they are: symlinks
    (never followed, never overwritten), and directories without a manifest (earlier releases): refused,
    naming the seal command, or sealed here with checkpoint.adopt_unsealed=true."""
    from ..checkpoint_seal import COMMAND, SealError, seal_checkpoint, unsealed
    if not root.is_dir():
        return None, []
    links = sorted(p for p in root.glob("step_*") if p.is_symlink())
    if links:
        return (f"{links[0]} is a symlink (to {os.readlink(links[0])}); the job never loads a checkpoint through a "
                "link, nor overwrites one at the next save of that step. Replace the link with the directory "
                "itself (mv), or move it out of checkpoints/"), []
    bare = unsealed(root)
    if not bare:
        return None, []
    names = ", ".join(p.name for p in bare[:4]) + (f" (and {len(bare) - 4} more)" if len(bare) > 4 else "")
    if not getattr(cfg.checkpoint, "adopt_unsealed", False):
        return (f"{root} holds checkpoint(s) without {MANIFEST}: {names} (written by an earlier release, or copied "
                "by hand). They are never loaded unverified (DCP/DeepSpeed files are pickles), overwritten or "
                f"removed. Seal them: `{COMMAND} {root}` (checks that every file loads with safe loaders, then "
                "writes the manifests) and relaunch; or relaunch with --override checkpoint.adopt_unsealed=true "
                "(the job does the same); or use a fresh log.out_dir"), []
    run_id = "sealed-" + uuid.uuid4().hex[:8]  # one run: the earlier release's checkpoints of this out_dir
    try:
        lines = [seal_checkpoint(d, run_id) for d in bare]
    except SealError as e:
        return f"checkpoint.adopt_unsealed=true, but sealing failed (nothing was loaded): {e}", []
    return None, [f"adopted (checkpoint.adopt_unsealed): {line}" for line in lines]


def record_run_id(run_id: str, rank: int) -> None:
    """Remember the run id in torchrun's agent store, so that a restarted worker group (which may
    run with checkpoint.resume=never) knows which checkpoints are its own."""
    if rank != 0:
        return
    store = _agent_store()
    if store is not None:
        try:
            store.set(_STORE_RUN_KEY, run_id)
        except Exception:  # noqa: BLE001 - without the store a restart with resume=never is refused
            pass


# ------------------------------------------------------------------ resuming with a changed config
# keys whose change would make the resumed run silently different from the saved one: refused
REFUSED_CHANGES = ("engine.name", "engine.zero_stage", "engine.dtype", "model", "optimizer", "train.seed",
                   "train.global_batch_size", "data.dtype", "data.val_fraction", "data.corpus_max_bytes")
# keys that may differ without a word (where the run is and how it is shown)
_SILENT = ("log.out_dir", "checkpoint.resume", "checkpoint.convert", "log.progress", "log.plot", "log.tensorboard",
           "engine.device", "engine.backend")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "deepspeed":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _optimizer_params(section: dict) -> dict:
    """The optimizer's hyperparameters with its defaults filled in (so lr given or defaulted compare)."""
    import inspect

    from sharded_msam_sf.config import optimizer_kwargs_from_config
    from sharded_msam_sf.optimizer import AdamWMSAMScheduleFree
    kwargs = optimizer_kwargs_from_config(section)
    full = {n: p.default for n, p in inspect.signature(AdamWMSAMScheduleFree.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}
    full.update(kwargs)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()}


def compare_config(saved: dict, cfg, allow: tuple = ()) -> tuple[list[str], list[str]]:
    """(refused changes, applied changes), each as 'key: saved -> now'; keys in ``allow`` are applied
    even when REFUSED_CHANGES lists them (engine.zero_stage through a universal checkpoint)."""
    now = cfg.to_dict()
    old_flat, new_flat = _flatten({k: v for k, v in saved.items() if k != "optimizer"}), \
        _flatten({k: v for k, v in now.items() if k != "optimizer"})
    try:
        old_opt = _optimizer_params(saved.get("optimizer", {}))
    except ValueError as e:
        return [f"optimizer: the checkpoint's optimizer section is invalid ({e})"], []
    new_opt = _optimizer_params(now["optimizer"])
    for k in sorted(set(old_opt) | set(new_opt)):
        old_flat[f"optimizer.params.{k}"] = old_opt.get(k)
        new_flat[f"optimizer.params.{k}"] = new_opt.get(k)
    old_flat["optimizer.type"] = (saved.get("optimizer") or {}).get("type", "AdamWMSAMScheduleFree")
    new_flat["optimizer.type"] = now["optimizer"].get("type", "AdamWMSAMScheduleFree")
    # a key added to the schema after the checkpoint was written (model.tie_embeddings, parallel.pp) counts as
    # unchanged when it holds its default, the behaviour of the code that wrote the checkpoint
    defaults = _flatten(type(cfg).model_construct().to_dict())
    refused, applied = [], []
    for key in sorted(set(old_flat) | set(new_flat)):
        a, b = old_flat.get(key, defaults.get(key)), new_flat.get(key)
        if a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
            continue
        if key in _SILENT:
            continue
        line = f"{key}: {a!r} -> {b!r}"
        if key not in allow and any(key == r or key.startswith(r + ".") for r in REFUSED_CHANGES):
            refused.append(line)
        else:
            applied.append(line)
    return refused, applied


def check_config_change(saved: dict, cfg, path: Path, allow: tuple = ()) -> list[str]:
    """Raise CheckpointError for refused changes; return the applied ones (to be reported)."""
    refused, applied = compare_config(saved, cfg, allow)
    if refused:
        raise CheckpointError(
            f"the config differs from the one {path} was written with, in keys that change what the resumed "
            "run computes: " + "; ".join(refused) + ". Resume with the checkpoint's values, or start a new run "
            "in a fresh log.out_dir")
    return applied


# ------------------------------------------------------------------ export and signals
def export_weights(engine, path: Path, rank: int, meta: dict) -> None:
    """Write the full model weights (call in the optimizer's eval mode: x) for inference as the export
    directory ``path`` (``model.safetensors`` + ``export.json``: sharded_msam_sf.weights_io); collective."""
    from ..weights_io import save_weights
    sd = engine.full_state_dict()
    if rank == 0:
        make_private_dir(path.parent)
        save_weights(sd, path, meta)


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop agrees on it across ranks, checkpoints and exits.

    Repeated SIGTERMs while the stop is pending are absorbed (counted in `repeats`): Slurm signals
    every process of the step and torchrun forwards its own SIGTERM to the workers, so a worker
    usually gets two, and the second must not abort the checkpoint. torchrun kills the workers
    (SIGKILL) --shutdown-timeout seconds (default 30) after forwarding, so the step in flight and the
    save must fit in that window. A second SIGINT (Ctrl-C twice) stops at once, without a checkpoint."""

    def __init__(self):
        self.signum = 0
        self.repeats = 0
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT and self.signum == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt("second SIGINT: stopping without a checkpoint")
        if self.signum:
            self.repeats += 1
            return
        self.signum = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
