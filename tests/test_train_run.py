"""The main job end to end: 2 CPU ranks under torchrun (gloo, 127.0.0.1, a free port per run).

Covers the default config beating the unigram baseline, a few steps of every engine
config, resume == uninterrupted (by max_steps and by SIGTERM to the whole process tree),
a SIGKILLed rank restarted by torchrun --max-restarts from the last checkpoint, and the
faults of issue 14: a planted pickle and a corrupt shard (fallback to the checkpoint that
verifies), a resume with another sam_mode, orphaned workers holding the out_dir, and a
run whose steps are all skipped.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def torchrun_cmd(config: str, out_dir: Path, *overrides: str, max_restarts: int = 0, extra=(),
                 nproc: int = 2) -> list[str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--local-addr", "127.0.0.1",
           "--max-restarts", str(max_restarts), "-m", "sharded_msam_sf.train", "--config", str(ROOT / config),
           "--override", f"log.out_dir={out_dir}", "--override", "log.progress=lines"]
    for o in overrides:
        cmd += ["--override", o]
    return cmd + list(extra)


def run_job(config, out_dir, *overrides, extra=(), timeout=240, expect_rc=0, nproc=2):
    proc = subprocess.run(torchrun_cmd(config, out_dir, *overrides, extra=extra, nproc=nproc), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if expect_rc is not None:
        assert proc.returncode == expect_rc, f"rc {proc.returncode}\n{proc.stderr[-6000:]}"
    return proc


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def train_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in metrics(out_dir) if "train_loss" in r}


def val_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in metrics(out_dir) if "val_loss" in r}


def exported(out_dir: Path) -> dict:
    from sharded_msam_sf.weights_io import load_weights
    sd, meta = load_weights(out_dir / "export")
    return {"model": sd, "meta": meta}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = exported(a)["model"], exported(b)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k}: max diff {(wa[k] - wb[k]).abs().max().item()}"


@pytest.fixture(scope="module", autouse=True)
def deepspeed_op_built():
    """DeepSpeed JIT-builds its shm comm op on first use; two ranks building at once can abort."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return
    subprocess.run([sys.executable, "-c", "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; "
                    "B().load()"], env=_env(), check=True, capture_output=True, timeout=600)


# ------------------------------------------------------------------ the default
def test_default_config_end_to_end_beats_unigram(tmp_path):
    """launch/torchrun.sh with only an out_dir runs configs/job/default.json (DeepSpeed ZeRO-2, one_pass)."""
    out = tmp_path / "default"
    env = dict(_env(), MASTER_PORT=str(_free_port()))
    proc = subprocess.run(["bash", str(ROOT / "launch/torchrun.sh"), "--override", f"log.out_dir={out}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "deepspeed (2 ranks, cpu, fp32)" in proc.stderr
    summary_line = [ln for ln in proc.stderr.splitlines() if ln.startswith("done: ")]
    assert len(summary_line) == 1 and "tok/s" in summary_line[0] and "peak RSS MiB per rank" in summary_line[0]
    recs = metrics(out)
    summary = recs[-1]["summary"]
    assert summary["final_step"] == 150
    assert summary["val_loss"] < summary["unigram_baseline"] - 0.3, summary
    assert len(summary["peak_mem_mib_per_rank"]) == 2
    assert (out / "loss.png").stat().st_size > 1000
    vals = val_losses(out)
    assert sorted(vals) == [50, 100, 150] and vals[150] < vals[50]

    # the export holds the eval-mode (x) weights the reported validation loss was measured with
    from sharded_msam_sf.job.config import load_config
    from sharded_msam_sf.job.data import Batches, load_corpus
    from sharded_msam_sf.job.engines import build_model
    cfg = load_config(ROOT / "configs/job/default.json", world_size=1)
    model = build_model(cfg)
    model.load_state_dict(exported(out)["model"])
    model.eval()
    with torch.no_grad():
        losses = [model(x, y).item() for x, y, w in Batches(load_corpus(cfg), cfg, 0, 1).eval_micro_batches("cpu")]
    assert abs(sum(losses) / len(losses) - vals[150]) < 1e-4


# ------------------------------------------------------------------ every engine
def check_run(out: Path, steps: int, ckpt_interval: int) -> None:
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses[steps] < losses[1]
    assert (out / "checkpoints" / "latest").read_text() == f"step_{steps:06d}"
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept == [f"step_{s:06d}" for s in (steps - ckpt_interval, steps)]  # checkpoint.keep = 2
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert set(exported(out)["model"]) >= {"wte.weight", "blocks.0.attn.q.weight"}


# ddp, fsdp2 and zero2 (the default) run in the resume tests below
@pytest.mark.parametrize("config, overrides", [
    ("configs/job/fsdp1-cpu.json", ()),
    ("configs/job/zero1-cpu.json", ("optimizer.params.sam_mode=two_pass",)),
    ("configs/job/zero3-cpu.json", ()),
], ids=["fsdp1", "zero1-two_pass", "zero3"])
def test_engine_config_runs(tmp_path, config, overrides):
    out = tmp_path / "run"
    extra = ()
    if "fsdp1" in config:  # also: a user's token file (nanoGPT layout) instead of the embedded corpus
        import numpy as np
        data = tmp_path / "data"
        data.mkdir()
        import argparse
        text = np.frombuffer(Path(argparse.__file__).read_bytes(), dtype=np.uint8)
        text[: len(text) * 9 // 10].astype(np.uint16).tofile(data / "train.bin")
        text[len(text) * 9 // 10:].astype(np.uint16).tofile(data / "val.bin")
        extra = ("--data", str(data))
    proc = run_job(config, out, "train.max_steps=6", "eval.interval=3", "checkpoint.interval=3",
                   "log.interval=1", *overrides, extra=extra)
    assert "done: step 6" in proc.stderr
    if extra:
        assert f"token file {data} (uint16)" in proc.stderr
    check_run(out, 6, 3)


def test_mpirun_launcher_runs_the_job(tmp_path):
    """launch/mpirun.sh (MPICH's mpiexec from the venv): ranks come from PMI_RANK/PMI_SIZE, not torchrun."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec next to the interpreter (pip install mpich)")
    out = tmp_path / "mpi"
    env = dict(_env(), MASTER_PORT=str(_free_port()), MODULE="sharded_msam_sf.train", NP="2")
    proc = subprocess.run(["bash", str(ROOT / "launch/mpirun.sh"), "--config", str(ROOT / "configs/job/ddp-cpu.json"),
                           "--override", f"log.out_dir={out}", "--override", "train.max_steps=4",
                           "--override", "log.interval=1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "ddp (2 ranks, cpu, fp32)" in proc.stderr
    assert sorted(train_losses(out)) == [1, 2, 3, 4]


# ------------------------------------------------------------------ resume
RESUME = ("train.max_steps=12", "eval.interval=3", "checkpoint.interval=3", "log.interval=1")


@pytest.mark.parametrize("config, overrides", [
    ("configs/job/ddp-cpu.json", ("optimizer.params.sam_mode=two_pass", "train.micro_batch_size=4")),
    ("configs/job/default.json", ()),
    ("configs/job/fsdp2-cpu.json", ()),
], ids=["ddp-two_pass-accum2", "zero2", "fsdp2"])
def test_resume_equals_uninterrupted(tmp_path, config, overrides):
    """Stop after step 6 (its checkpoint), resume with --resume: the same losses and weights as one run."""
    full, part = tmp_path / "full", tmp_path / "part"
    run_job(config, full, *RESUME, *overrides)
    check_run(full, 12, 3)
    run_job(config, part, *RESUME, *overrides, "train.max_steps=6")
    proc = run_job(config, part, *RESUME, *overrides, extra=["--resume"])
    assert "resumed from" in proc.stderr and "at step 6" in proc.stderr
    assert train_losses(part) == train_losses(full)
    assert val_losses(part) == val_losses(full)
    assert_same_weights(part, full)


def test_resume_flag_without_checkpoint_fails(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sharded_msam_sf.train", "--config",
                           str(ROOT / "configs/job/ddp-cpu.json"), "--override", f"log.out_dir={tmp_path}",
                           "--resume"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr, proc.stderr


def _kill_tree(proc: subprocess.Popen, workers=()) -> None:
    """Kill torchrun and its workers, so a failed test leaves no ranks behind. torchrun starts each
    worker in a session of its own, so they are killed by pid (also `workers`, orphans of an agent
    that is gone)."""
    pids = set(workers) | set(_worker_pids(proc.pid).values())
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        try:
            done = train_losses(out)
        except (OSError, json.JSONDecodeError):  # not there yet, or a line being written
            done = {}
        if done and max(done) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


LONG = ("train.max_steps=120", "eval.interval=100", "checkpoint.interval=20", "log.interval=1")


@pytest.fixture(scope="module")
def ddp_long_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref"
    run_job("configs/job/ddp-cpu.json", out, *LONG)
    return out


def test_sigterm_checkpoints_and_resume_matches(tmp_path, ddp_long_reference):
    out = tmp_path / "sig"
    proc = subprocess.Popen(torchrun_cmd("configs/job/ddp-cpu.json", out, *LONG), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_step(out, 30, proc)
        workers = _worker_pids(proc.pid)
        # what Slurm does on scancel/preemption: SIGTERM to every process of the tree; torchrun forwards
        # a second one to the workers, and a third arrives while the stop is pending: all are absorbed
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.2)
        for pid in workers.values():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_tree(proc)
    assert "stopped by signal 15" in err, err[-4000:]
    ckpt = (out / "checkpoints" / "latest").read_text()
    stopped_at = int(ckpt.split("_")[1])
    assert 30 <= stopped_at < 120
    resumed = run_job("configs/job/ddp-cpu.json", out, *LONG, extra=["--resume"])
    assert f"at step {stopped_at}" in resumed.stderr
    assert train_losses(out) == train_losses(ddp_long_reference)
    assert_same_weights(out, ddp_long_reference)


def _worker_pids(parent: int) -> dict[int, int]:
    """{RANK: pid} of torchrun's worker processes."""
    out = {}
    for child in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = int(child)
    return out


def test_killed_rank_is_restarted_from_the_last_checkpoint(tmp_path, ddp_long_reference):
    out = tmp_path / "kill"
    proc = subprocess.Popen(torchrun_cmd("configs/job/ddp-cpu.json", out, *LONG, max_restarts=1), cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_step(out, 45, proc)
        before = int((out / "checkpoints" / "latest").read_text().split("_")[1])
        assert before >= 40
        pids = _worker_pids(proc.pid)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=240)
    finally:
        _kill_tree(proc)
    assert proc.returncode == 0, err[-6000:]
    resumed = [ln for ln in err.splitlines() if ln.startswith("resumed from")]
    assert len(resumed) == 1, err[-4000:]
    resumed_at = int(resumed[0].rsplit(" ", 1)[1])
    assert resumed_at >= before  # nothing checkpointed before the kill was lost
    assert max(train_losses(out)) == 120
    assert train_losses(out) == train_losses(ddp_long_reference)
    assert_same_weights(out, ddp_long_reference)


# ------------------------------------------------------------------ faults (issue 14)
class _Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_and_corrupt_checkpoint_fall_back(tmp_path):
    """DeepSpeed loads its *_model_states.pt with weights_only=False: a planted pickle there must never be
    loaded. The manifest check refuses it, names the file, and the job resumes from the previous
    checkpoint; a resume with another sam_mode is then refused (it would run two passes on a one_pass
    optimizer state)."""
    out = tmp_path / "ds"
    run_job("configs/job/default.json", out, "train.max_steps=6", "checkpoint.interval=3", "eval.interval=3",
            "log.interval=1", "checkpoint.export=false")
    marker = tmp_path / "code-ran"
    target = out / "checkpoints" / "step_000006" / "mp_rank_00_model_states.pt"
    assert target.is_file()
    import pickle
    target.write_bytes(pickle.dumps(_Planted(marker)))
    proc = run_job("configs/job/default.json", out, "train.max_steps=9", "checkpoint.interval=3", "eval.interval=3",
                   "log.interval=1", "checkpoint.export=false")
    assert not marker.exists()
    assert "step_000006 fails verification, not loaded" in proc.stderr
    assert "mp_rank_00_model_states.pt has" in proc.stderr  # names the file
    assert "the newest checkpoint that verifies" in proc.stderr and "at step 3" in proc.stderr
    assert max(train_losses(out)) == 9
    proc = run_job("configs/job/default.json", out, "train.max_steps=12", "optimizer.params.sam_mode=two_pass",
                   expect_rc=1)
    assert "optimizer.params.sam_mode: 'one_pass' -> 'two_pass'" in proc.stderr, proc.stderr[-3000:]


def test_orphaned_workers_block_a_relaunch(tmp_path):
    """SIGKILL to the torchrun agent leaves its workers training. A relaunch on the same out_dir is refused
    (rank 0's lock), naming the holder; once they are gone the lock is free again."""
    out = tmp_path / "orphans"
    workers = {}
    endless = ("train.max_steps=100000", "eval.interval=0", "checkpoint.interval=20", "log.interval=1")
    agent = subprocess.Popen(torchrun_cmd("configs/job/ddp-cpu.json", out, *endless), cwd=ROOT, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_step(out, 2, agent)
        workers = _worker_pids(agent.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(agent.pid, signal.SIGKILL)  # the agent only: its workers become orphans
        agent.wait(timeout=30)
        time.sleep(0.5)
        assert all(Path(f"/proc/{pid}").exists() for pid in workers.values())  # still training
        proc = run_job("configs/job/ddp-cpu.json", out, "train.max_steps=3", expect_rc=1, timeout=120)
        assert "is in use by another job" in proc.stderr and f'"pid": {workers[0]}' in proc.stderr, \
            proc.stderr[-3000:]
    finally:
        _kill_tree(agent, workers.values())
    for pid in workers.values():  # orphans are reaped by init: wait until they are gone
        for _ in range(200):
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except (OSError, IndexError):
                break
            time.sleep(0.05)
    shutil.rmtree(out / "checkpoints")  # the killed run's (possibly mid-save) checkpoints are not the point
    run_job("configs/job/ddp-cpu.json", out, "train.max_steps=2", "eval.interval=0", "checkpoint.export=false")


def test_all_steps_skipped_stops_the_job(tmp_path):
    """A learning rate that blows the weights up: every later gradient is NaN and the step is skipped.
    After train.max_skipped_steps consecutive skips the job stops with status 3, and the newest
    checkpoint with a finite loss is kept although checkpoint.keep = 1."""
    out = tmp_path / "nan"
    proc = subprocess.run([sys.executable, "-m", "sharded_msam_sf.train", "--config",
                           str(ROOT / "configs/job/ddp-cpu.json"), "--override", f"log.out_dir={out}",
                           "--override", "train.max_steps=30", "--override", "checkpoint.interval=1",
                           "--override", "checkpoint.keep=1", "--override", "eval.interval=0",
                           "--override", "train.max_skipped_steps=3", "--override", "optimizer.params.lr=1e30",
                           "--override", "optimizer.params.warmup_steps=0", "--override", "train.grad_clip=0",
                           "--override", "log.progress=lines", "--override", "log.interval=1"], cwd=ROOT,
                          env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "3 consecutive steps were skipped" in proc.stderr and "train.max_skipped_steps" in proc.stderr
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    finite = [s for s, v in train_losses(out).items() if v == v]
    assert f"step_{max(finite):06d}" in kept and len(kept) == 2, kept  # the newest finite + the newest
    assert f"loss was finite (never pruned): {out / 'checkpoints' / f'step_{max(finite):06d}'}" in proc.stderr


def test_planted_dcp_metadata_is_never_loaded(tmp_path):
    """DCP unpickles an FSDP checkpoint's .metadata: a planted one fails verification (naming the file)
    and, with no other checkpoint to fall back to, the job stops rather than start afresh over it."""
    out = tmp_path / "fsdp2"
    run_job("configs/job/fsdp2-cpu.json", out, "train.max_steps=2", "checkpoint.interval=2", "eval.interval=0",
            "checkpoint.export=false", "log.plot=false")
    marker = tmp_path / "code-ran"
    import pickle
    (out / "checkpoints" / "step_000002" / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    proc = run_job("configs/job/fsdp2-cpu.json", out, "train.max_steps=4", expect_rc=1)
    assert not marker.exists()
    assert "no checkpoint to resume verifies" in proc.stderr and "step_000002/.metadata has" in proc.stderr, \
        proc.stderr[-3000:]
