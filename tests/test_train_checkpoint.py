"""The main job's checkpoint files (single process, no process group): atomic writes, manifests and
their verification, fallback to the newest checkpoint that verifies, run identity, pruning, the
out_dir lock and permission checks, config changes on resume, signals, a full disk."""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import stat

import pytest
import torch

from sharded_msam_sf.job import checkpoint as ck_mod
from sharded_msam_sf.job.checkpoint import (MANIFEST, STATE_FILE, CheckpointError, Checkpointer, RunDirError,
                                            RunLock, StopSignal, atomic_torch_save, check_config_change,
                                            check_out_dir, load_torch_file, plan_resume, read_state, sha256_file,
                                            verify)
from sharded_msam_sf.job.config import load_config
from sharded_msam_sf.job.progress import Progress


class FakeEngine:
    """Writes what DCP writes: a pickled `.metadata` and a tensor file."""

    def __init__(self, value: float = 1.0, fail: Exception | None = None):
        self.value, self.fail = value, fail

    def save(self, path):
        if self.fail is not None:
            raise self.fail
        torch.save({"w": torch.full((1000,), self.value)}, path / "__0_0.distcp")
        (path / ".metadata").write_bytes(pickle.dumps({"step": self.value}))


class Planted:
    """A pickle that runs code when loaded (what an attacker would plant)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def cfg_for(out_dir, *overrides, engine="fsdp2"):
    return load_config(None, [f"log.out_dir={out_dir}", f"engine.name={engine}", *overrides], world_size=1)


def save_steps(out_dir, steps, run_id="run-a", engine="fsdp2", keep=10, healthy=None):
    cfg = cfg_for(out_dir, engine=engine)
    ck = Checkpointer(out_dir, 0, keep, 1, run_id=run_id)
    for s in steps:
        state = {"engine": engine, "world_size": 1, "config": cfg.to_dict(),
                 "healthy": True if healthy is None else healthy(s)}
        ck.save(FakeEngine(float(s)), s, state)
    return ck


def flip_byte(path, at=None):
    b = bytearray(path.read_bytes())
    i = len(b) // 2 if at is None else at
    b[i] ^= 0x40
    path.write_bytes(bytes(b))


# ------------------------------------------------------------------ weights-only files, atomic writes
def test_truncated_or_foreign_file_is_a_clear_error(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"model": {"w": torch.arange(10_000.0)}}, path)
    assert torch.equal(load_torch_file(path)["model"]["w"], torch.arange(10_000.0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_torch_file(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_torch_file(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_torch_file(tmp_path / "missing.pt")


def test_code_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Planted(tmp_path / "ran")}, path)
    with pytest.raises(CheckpointError):
        load_torch_file(path)
    assert not (tmp_path / "ran").exists()


def test_atomic_save_leaves_no_temporary_and_replaces_whole(tmp_path):
    path = tmp_path / "a.pt"
    atomic_torch_save({"v": 1}, path)
    atomic_torch_save({"v": 2}, path)
    assert load_torch_file(path) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


# ------------------------------------------------------------------ manifests
def test_save_writes_a_manifest_that_verifies(tmp_path):
    ck = save_steps(tmp_path, [3])
    d = tmp_path / "checkpoints" / "step_000003"
    m = json.loads((d / MANIFEST).read_text())
    assert (m["run_id"], m["step"], m["engine"], m["world_size"]) == ("run-a", 3, "fsdp2", 1)
    assert set(m["files"]) == {"__0_0.distcp", ".metadata", STATE_FILE}
    assert m["files"][".metadata"]["sha256"] == sha256_file(d / ".metadata")
    assert m["files"]["__0_0.distcp"]["size"] == (d / "__0_0.distcp").stat().st_size
    assert read_state(d)["run_id"] == "run-a"
    assert verify(d, engine="fsdp2") == []
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000003"
    assert ck.candidates() == [d]


@pytest.mark.parametrize("fault, message", [
    ("flip", r"__0_0\.distcp does not match its SHA-256"),
    ("truncate", r"__0_0\.distcp has \d+ bytes, the manifest says"),
    ("plant", r"\.metadata2 is not in the manifest"),
    ("replace_metadata", r"/\.metadata has \d+ bytes, the manifest says"),
    ("delete", r"__0_0\.distcp is missing"),
    ("symlink", r"evil is a symlink"),
    ("no_manifest", r"has no manifest\.json"),
    ("corrupt_manifest", r"manifest .* is corrupt"),
    ("state_without_step", r"job_state\.json has no valid 'step'"),
])
def test_verification_names_the_bad_file(tmp_path, fault, message):
    save_steps(tmp_path, [3])
    d = tmp_path / "checkpoints" / "step_000003"
    marker = tmp_path / "code-ran"
    if fault == "flip":
        flip_byte(d / "__0_0.distcp")
    elif fault == "truncate":
        data = (d / "__0_0.distcp").read_bytes()
        (d / "__0_0.distcp").write_bytes(data[:-100])
    elif fault == "plant":
        (d / ".metadata2").write_bytes(pickle.dumps(Planted(marker)))
    elif fault == "replace_metadata":  # DCP would unpickle this and run the planted code
        (d / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    elif fault == "delete":
        (d / "__0_0.distcp").unlink()
    elif fault == "symlink":
        (d / "evil").symlink_to("/etc/passwd")
    elif fault == "no_manifest":
        (d / MANIFEST).unlink()
    elif fault == "corrupt_manifest":
        (d / MANIFEST).write_text("{")
    elif fault == "state_without_step":  # a consistent manifest, but job_state.json lacks its step
        state = json.loads((d / STATE_FILE).read_text())
        del state["step"]
        (d / STATE_FILE).write_text(json.dumps(state))
        m = json.loads((d / MANIFEST).read_text())
        m["files"][STATE_FILE] = {"size": (d / STATE_FILE).stat().st_size, "sha256": sha256_file(d / STATE_FILE)}
        (d / MANIFEST).write_text(json.dumps(m))
    problems = verify(d, engine="fsdp2")
    assert problems and any(re.search(message, p) for p in problems), problems
    assert not marker.exists()


def test_checkpoint_of_another_engine_is_refused(tmp_path):
    save_steps(tmp_path, [3], engine="ddp")
    problems = verify(tmp_path / "checkpoints" / "step_000003", engine="deepspeed")
    assert any("checkpoint of engine 'ddp'" in p and "uses 'deepspeed'" in p for p in problems), problems
    with pytest.raises(CheckpointError, match="checkpoint of engine 'ddp'"):
        plan_resume(cfg_for(tmp_path, engine="deepspeed"), Checkpointer(tmp_path, 0, 2, 1))


# ------------------------------------------------------------------ resume: fallback, pointer, run identity
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    save_steps(tmp_path, [3, 6, 9])
    root = tmp_path / "checkpoints"
    flip_byte(root / "step_000009" / "__0_0.distcp")
    (root / "step_000006" / "__0_0.distcp").write_bytes(b"")  # a truncated shard
    plan = plan_resume(cfg_for(tmp_path), Checkpointer(tmp_path, 0, 2, 1))
    assert plan.path == root / "step_000003" and plan.run_id == "run-a" and plan.state["step"] == 3
    text = "\n".join(plan.notes)
    assert "step_000009 fails verification" in text and "__0_0.distcp does not match its SHA-256" in text
    assert "step_000006 fails verification" in text and "has 0 bytes" in text
    assert "the newest checkpoint that verifies" in text
    flip_byte(root / "step_000003" / ".metadata", at=0)
    with pytest.raises(CheckpointError, match="no checkpoint to resume verifies"):  # never a silent fresh start
        plan_resume(cfg_for(tmp_path), Checkpointer(tmp_path, 0, 2, 1))


def test_fallback_stays_within_the_run(tmp_path):
    save_steps(tmp_path, [3], run_id="old-run")
    save_steps(tmp_path, [6], run_id="new-run")
    flip_byte(tmp_path / "checkpoints" / "step_000006" / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="step_000003 belongs to run old-run, not to this run \\(new-run\\)"):
        plan_resume(cfg_for(tmp_path), Checkpointer(tmp_path, 0, 2, 1))


def test_explicit_path_does_not_fall_back(tmp_path):
    save_steps(tmp_path, [3, 6])
    root = tmp_path / "checkpoints"
    flip_byte(root / "step_000006" / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"step_000006/__0_0\.distcp does not match"):
        plan_resume(cfg_for(tmp_path, f"checkpoint.resume={root / 'step_000006'}"), Checkpointer(tmp_path, 0, 2, 1))


def test_explicit_path_into_another_runs_out_dir_is_refused(tmp_path):
    save_steps(tmp_path / "a", [3], run_id="run-a")
    save_steps(tmp_path / "b", [5], run_id="run-b")
    src = tmp_path / "a" / "checkpoints" / "step_000003"
    with pytest.raises(RunDirError, match="holds checkpoints of run.*run-b.*belongs to run run-a"):
        plan_resume(cfg_for(tmp_path / "b", f"checkpoint.resume={src}"), Checkpointer(tmp_path / "b", 0, 2, 1))
    plan = plan_resume(cfg_for(tmp_path / "c", f"checkpoint.resume={src}"), Checkpointer(tmp_path / "c", 0, 2, 1))
    assert plan.path == src and plan.run_id == "run-a"  # into a fresh out_dir: the run continues there


def test_fresh_and_must(tmp_path):
    plan = plan_resume(cfg_for(tmp_path), Checkpointer(tmp_path, 0, 2, 1))
    assert plan.path is None and len(plan.run_id) == 12
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        plan_resume(cfg_for(tmp_path, "checkpoint.resume=must"), Checkpointer(tmp_path, 0, 2, 1))


def test_latest_pointer(tmp_path):
    ck = save_steps(tmp_path, [10, 20])
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_000030").mkdir()  # a save interrupted before its rename
    (root / "step_000040").mkdir()  # no manifest: not complete
    assert ck.latest().name == "step_000020"
    (root / "latest").write_text("step_000010")
    assert ck.latest().name == "step_000010"  # the pointer wins when it names a complete checkpoint
    (root / "latest").write_text("step_000040")
    assert ck.latest().name == "step_000020"  # ... and is passed over when it does not
    for bad in ("../../elsewhere/step_000001", "/tmp/step_000001", ".."):
        (root / "latest").write_text(bad)
        with pytest.raises(CheckpointError, match="refusing a pointer that leaves out_dir"):
            ck.latest()
    (root / "latest").unlink()
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (root / "latest").symlink_to(outside)
    with pytest.raises(CheckpointError, match="symlink"):
        ck.latest()


def test_resume_never_refuses_another_runs_checkpoints(tmp_path, monkeypatch):
    save_steps(tmp_path, [3])
    never = cfg_for(tmp_path, "checkpoint.resume=never")
    with pytest.raises(RunDirError, match=r"holds checkpoints of another run \(run run-a, newest step 3\)"):
        plan_resume(never, Checkpointer(tmp_path, 0, 2, 1))
    # a torchrun restart of a run started with resume=never continues its own checkpoints (the run id
    # is kept in torchrun's agent store), and is refused when the store does not name this run
    store = torch.distributed.HashStore()
    monkeypatch.setattr(ck_mod, "_agent_store", lambda: store)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(RunDirError, match="another run"):
        plan_resume(never, Checkpointer(tmp_path, 0, 2, 1))
    ck_mod.record_run_id("run-a", 0)
    plan = plan_resume(never, Checkpointer(tmp_path, 0, 2, 1))
    assert plan.path == tmp_path / "checkpoints" / "step_000003" and plan.run_id == "run-a"
    ck_mod.record_run_id("run-b", 0)
    with pytest.raises(CheckpointError, match="belongs to run run-a, not to this run"):
        plan_resume(never, Checkpointer(tmp_path, 0, 2, 1))


def test_prune_keeps_the_newest_finite_checkpoint_and_other_runs(tmp_path):
    save_steps(tmp_path, [1], run_id="other")
    save_steps(tmp_path, [2, 3, 4, 5], run_id="mine", keep=2, healthy=lambda s: s <= 2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    # keep=2: steps 4 and 5; step 2 (the newest with a finite loss) stays; step 1 is another run's
    assert names == ["step_000001", "step_000002", "step_000004", "step_000005"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000005"


# ------------------------------------------------------------------ a full disk
def test_full_disk_names_the_path_and_keeps_the_last_checkpoint(tmp_path):
    ck = save_steps(tmp_path, [3])
    cfg = cfg_for(tmp_path)
    state = {"engine": "fsdp2", "world_size": 1, "config": cfg.to_dict()}
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(CheckpointError, match=r"no space left on device while writing .*\.tmp-step_000006"):
        ck.save(FakeEngine(fail=full), 6, state)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000003"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    # metrics.jsonl on a full device (/dev/full answers every write with ENOSPC)
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    progress = Progress(True, tmp_path, "none", 0, 10, 1)
    with pytest.raises(OSError, match=r"no space left on device while writing .*metrics\.jsonl"):
        progress.record(step=1, train_loss=1.0)


# ------------------------------------------------------------------ config changes on resume
def test_config_change_on_resume(tmp_path):
    saved = cfg_for(tmp_path).to_dict()
    for override, key in [("optimizer.params.lr=0.01", "optimizer.params.lr"),
                          ("optimizer.params.rho=0.5", "optimizer.params.rho"),
                          ("optimizer.params.sam_mode=two_pass", "optimizer.params.sam_mode"),
                          ("engine.name=ddp", "engine.name"), ("model.n_layer=3", "model.n_layer"),
                          ("train.seed=7", "train.seed")]:
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
            check_config_change(saved, cfg_for(tmp_path, override), tmp_path)
    applied = check_config_change(saved, cfg_for(tmp_path, "train.max_steps=500", "train.grad_clip=0.5",
                                                 "log.interval=1"), tmp_path)
    assert applied == ["log.interval: 10 -> 1", "train.grad_clip: 1.0 -> 0.5", "train.max_steps: 200 -> 500"]
    # lr given explicitly with its default value is no change
    lr = cfg_for(tmp_path).optimizer_kwargs.get("lr")
    if lr is not None:
        assert check_config_change(saved, cfg_for(tmp_path, f"optimizer.params.lr={lr}"), tmp_path) == []
    # a checkpoint written before model.tie_embeddings / parallel.pp existed: their defaults are no change
    older = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    del older["model"]["tie_embeddings"], older["parallel"]["pp"], older["parallel"]["schedule"]
    assert check_config_change(older, cfg_for(tmp_path), tmp_path) == []
    with pytest.raises(CheckpointError, match=r"model\.tie_embeddings: True -> False"):
        check_config_change(older, cfg_for(tmp_path, "model.tie_embeddings=false"), tmp_path)


# ------------------------------------------------------------------ the run directory
def test_lock_refuses_a_second_job(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunDirError, match=rf"in use by another job \(.*\"pid\": {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    again = RunLock(tmp_path)
    again.acquire()  # released: the next job (or a torchrun restart) gets in
    again.release()


def test_out_dir_writable_by_others_is_refused(tmp_path):
    out = tmp_path / "run"
    check_out_dir(out)  # missing: fine, created private
    out.mkdir()
    check_out_dir(out)
    os.chmod(out, 0o777)
    with pytest.raises(RunDirError, match="writable by every user"):
        check_out_dir(out)
    os.chmod(out, 0o1777)  # sticky does not help the run directory itself
    with pytest.raises(RunDirError, match="writable by every user"):
        check_out_dir(out)
    os.chmod(out, 0o775)
    if os.geteuid() == 0:  # group-writable by a shared group (here: daemon's) is refused
        os.chown(out, -1, 1)
        with pytest.raises(RunDirError, match="writable by group 1"):
            check_out_dir(out)
    os.chmod(out, 0o755)
    os.chmod(tmp_path, 0o777)  # a parent anyone can rename entries in
    try:
        with pytest.raises(RunDirError, match="without the sticky bit"):
            check_out_dir(out)
        os.chmod(tmp_path, 0o1777)  # like /tmp: fine
        check_out_dir(out)
    finally:
        os.chmod(tmp_path, 0o700)
    (out / "checkpoints").symlink_to(tmp_path)
    with pytest.raises(RunDirError, match="symlink"):
        check_out_dir(out)


def test_created_directories_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        save_steps(tmp_path / "run", [1])
    finally:
        os.umask(old)
    for p in (tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "run" / "checkpoints" / "step_000001"):
        assert not os.stat(p).st_mode & (stat.S_IWGRP | stat.S_IWOTH), p
    check_out_dir(tmp_path / "run")


# ------------------------------------------------------------------ signals
def test_repeated_sigterm_is_absorbed_and_a_second_sigint_stops():
    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's forwarded copy
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGTERM and stop.repeats == 2
    finally:
        stop.restore()
    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
