"""The main job on simulated nodes: two torchrun agents on 127.0.0.1 (c10d rendezvous), launched as
users launch them (launch/torchrun.sh in its multi-node form, launch/slurm.sbatch under a stand-in
srun/scontrol, launch/mpirun.sh with two Hydra "hosts"), and node loss.

- 2 nodes x 1 rank == 1 node x 2 ranks, bit for bit (losses, validation, exported weights), for DDP,
  FSDP2 and DeepSpeed ZeRO-2; each file under out_dir has one writer rank (an audit of every open for
  writing, tests/file_audit); metrics and the progress output come from one process.
- A node (agent + workers) SIGKILLed mid-run: with a replacement agent (--max-restarts) the job
  resumes from the last checkpoint, bit-identical to an uninterrupted run; elastic (--nnodes 1:2, no
  replacement) DDP/FSDP2 continue on one rank from the resharded checkpoint, with the global batch
  kept by accumulation, bit-identical to a 1-rank run resumed from the same checkpoint; FSDP2's
  resharded optimizer state is exact; DeepSpeed ZeRO-2 continues through a universal checkpoint, bit-identical
  to a 1-rank run resumed from the same checkpoint.

Every agent and worker of a test is SIGKILLed in `finally` (found by an environment tag, since
torchrun puts each worker in a session of its own).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train_run import deepspeed_op_built  # noqa: F401 (the fixture builds DeepSpeed's op once)
from tests.multinode import (ROOT, Agent, assert_same_weights, base_env, free_port, job_args, kill_tagged,
                             latest_step, train_losses, val_losses, wait_for_step, wait_listening, writers)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SHORT = ("train.max_steps=6", "eval.interval=3", "checkpoint.interval=3", "log.interval=1")
LONG = ("train.max_steps=120", "eval.interval=1000", "checkpoint.interval=20", "checkpoint.keep=10", "log.interval=1")
KILL_AT = 30  # the node is lost after this step is logged: the last checkpoint is step 20 (or later)
CONFIGS = {"ddp": "configs/job/ddp-cpu.json", "fsdp2": "configs/job/fsdp2-cpu.json",
           "zero2": "configs/job/default.json"}
ENGINE_NAMES = {"zero2": "deepspeed"}  # the job's engine.name, as its log line says it
MULTI = dict(NPROC="1", LOCAL_ADDR="127.0.0.1", RDZV_CONF="last_call_timeout=1,keep_alive_interval=1")




class Cluster:
    """The agents a test starts; `close()` kills them all with their workers."""

    def __init__(self, root: Path, audit: Path | None = None):
        self.root, self.agents, self.env = root, [], base_env(audit)

    def start(self, name: str, args: list[str], **launch: str) -> Agent:
        agent = Agent(self.root / name, args, self.env, **launch)
        self.agents.append(agent)
        return agent

    def two_nodes(self, args: list[str], nnodes: str = "2", **launch: str) -> tuple[Agent, Agent, int]:
        """Node 0 first (it hosts the rendezvous: losing it ends the job), then node 1. Elastic (MIN:MAX):
        the first round waits 5 s for more nodes (last_call_timeout) so that node 1, still starting, is in."""
        port = free_port()
        if ":" in nnodes:
            launch.setdefault("RDZV_CONF", "last_call_timeout=5,keep_alive_interval=1")
        launch = dict(MULTI, **launch)
        a0 = self.start("node0", args, NNODES=nnodes, NODE_RANK="0", MASTER_PORT=str(port), **launch)
        wait_listening(port, a0)
        a1 = self.start("node1", args, NNODES=nnodes, NODE_RANK="1", MASTER_PORT=str(port), **launch)
        return a0, a1, port

    def close(self) -> None:
        for a in self.agents:
            a.kill()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def audit_of(out: Path) -> Path:
    return out.parent / f"{out.name}.audit"


def one_node(tmp: Path, name: str, config: str, overrides, nproc: int = 2, extra=()) -> Path:
    """The same job through launch/torchrun.sh on one node (--standalone) with `nproc` ranks; its file
    audit in audit_of(out_dir)."""
    out = tmp / name
    c = Cluster(tmp / f"{name}-agent", audit_of(out))
    try:
        a = c.start("node", job_args(config, out, *overrides) + list(extra), NNODES="1", NPROC=str(nproc))
        assert a.wait(300) == 0, a.text()[-6000:]
    finally:
        c.close()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-node runs (2 ranks) shared by the tests of this module: reference(name, overrides) -> out_dir."""
    done: dict = {}

    def get(name: str, overrides) -> Path:
        key = (name, tuple(overrides))
        if key not in done:
            done[key] = one_node(tmp_path_factory.mktemp("ref"), name, CONFIGS[name], overrides)
        return done[key]
    return get


def assert_equal_runs(out: Path, ref: Path) -> None:
    assert train_losses(out) == train_losses(ref)
    assert val_losses(out) == val_losses(ref)
    assert_same_weights(out, ref)


def assert_complete_checkpoints(out: Path, steps: list[int]) -> None:
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == [f"step_{s:06d}" for s in steps]
    assert not list(root.glob(".tmp-*"))
    for s in steps:
        state = json.loads((root / f"step_{s:06d}" / "job_state.json").read_text())
        assert state["step"] == s and state["world_size"] == 2


# ------------------------------------------------------------------ 2 nodes == 1 node
@pytest.mark.parametrize("name", ["ddp", "fsdp2", "zero2"])
def test_two_nodes_equal_one_node(tmp_path, name, reference):
    """2 agents x 1 rank (c10d rendezvous, each agent in its own directory) == 1 agent x 2 ranks, bit for
    bit; every file under out_dir has a single writer rank; one process prints the progress."""
    ref = reference(name, SHORT)
    audit1, audit2 = audit_of(ref), tmp_path / "audit2"
    out = tmp_path / "two"
    c = Cluster(tmp_path / "agents", audit2)
    try:
        a0, a1, port = c.two_nodes(job_args(CONFIGS[name], out, *SHORT))
        assert a0.wait(300) == 0, a0.text()[-6000:]
        assert a1.wait(60) == 0, a1.text()[-6000:]
    finally:
        c.close()
    assert_equal_runs(out, ref)
    assert_complete_checkpoints(out, [3, 6])
    assert (out / "checkpoints" / "latest").read_text() == "step_000006"

    logs = [a0.text(), a1.text()]
    for log in logs:
        assert f"--rdzv-endpoint 127.0.0.1:{port}" in log and "--nnodes 2" in log and "--local-addr 127.0.0.1" in log
    printing = [log for log in logs if "done: step 6" in log]
    assert len(printing) == 1, "the summary must come from exactly one node"
    assert all(f"step {s}/6 |" in printing[0] for s in range(1, 7))
    silent = logs[1 - logs.index(printing[0])]
    assert "step 1/6" not in silent and "checkpoint:" not in silent
    assert not [p for p in (tmp_path / "agents").rglob("*") if p.is_file() and p.name != "agent.log"], \
        "a worker wrote into its node's working directory"

    for audit in (audit1, audit2):
        who = writers(audit, out if audit is audit2 else ref)
        assert who, "the file audit saw no writes"
        shared = {path: ranks for path, ranks in who.items() if len(ranks) > 1}
        assert not shared, f"files written by more than one rank: {shared}"
        for path in ("metrics.jsonl", "export/model.safetensors", "checkpoints/latest", "checkpoints/step_000006/job_state.json"):
            assert who.get(path) == {"0"}, (path, who.get(path))
        per_rank = {r for path, ranks in who.items() if path.startswith("checkpoints/step_000006/") for r in ranks}
        assert per_rank == ({"0"} if name == "ddp" else {"0", "1"})  # DDP: rank 0 saves; DCP/ZeRO: every rank
    assert set(writers(audit1, ref)) == set(writers(audit2, out))  # the same files, by the same ranks
    assert writers(audit1, ref) == writers(audit2, out)


# ------------------------------------------------------------------ Slurm and MPI launchers
def test_slurm_sbatch_under_stand_in_srun(tmp_path, reference):
    """launch/slurm.sbatch with a stand-in srun/scontrol (tests/fake_slurm): the head node is the first
    of SLURM_JOB_NODELIST, the port RDZV_PORT, the rendezvous id the job id; each node's agent reaches
    the others at its SLURMD_NODENAME; arguments (an out_dir with a space) pass through unchanged."""
    out = tmp_path / "out dir"
    port = free_port()
    srun_log = tmp_path / "srun.jsonl"
    env = base_env()
    env.update(PATH=f"{ROOT / 'tests' / 'fake_slurm'}{os.pathsep}{env['PATH']}", SLURM_JOB_NODELIST="127.0.0.[1-2]",
               SLURM_NNODES="2", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT), SLURM_CPUS_PER_TASK="1",
               RDZV_PORT=str(port), RDZV_CONF="last_call_timeout=1", FAKE_SRUN_LOG=str(srun_log),
               MULTINODE_TEST_AGENT=f"slurm-{tmp_path}")
    env.pop("MASTER_ADDR")
    try:
        proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), *job_args(CONFIGS["ddp"], out, *SHORT)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        kill_tagged(f"slurm-{tmp_path}")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert f"[slurm] job 4242: 2 node(s) x 1 proc(s), rendezvous 127.0.0.1:{port}" in log
    srun_args = json.loads(srun_log.read_text().splitlines()[0])
    assert srun_args[:6] == ["--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1", "bash"]
    assert log.count(f"--rdzv-backend c10d --rdzv-id 4242 --rdzv-endpoint 127.0.0.1:{port}") == 2
    for addr in ("127.0.0.1", "127.0.0.2"):  # each node's own address, the head's rendezvous
        assert log.count(f"--local-addr {addr}") == 1
    assert "--node-rank" not in log
    assert log.count("done: step 6") == 1
    assert_equal_runs(out, reference("ddp", SHORT))


def test_mpirun_two_hosts(tmp_path, reference):
    """launch/mpirun.sh with two Hydra hosts (127.0.0.1, 127.0.0.2; `-launcher fork` starts both proxies
    here instead of over ssh): each rank is local rank 0 of its host, and the run equals 1 node x 2 ranks."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec next to the interpreter (pip install mpich)")
    out = tmp_path / "mpi"
    tag = f"mpi-{tmp_path}"
    env = dict(base_env(), MASTER_PORT=str(free_port()), MODULE="sharded_msam_sf.train", NP="2",
               MPI_ARGS="-launcher fork -ppn 1 -hosts 127.0.0.1,127.0.0.2", MULTINODE_TEST_AGENT=tag)
    try:
        proc = subprocess.run(["bash", str(ROOT / "launch" / "mpirun.sh"), *job_args(CONFIGS["ddp"], out, *SHORT)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        kill_tagged(tag)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "ddp (2 ranks, cpu, fp32)" in proc.stderr
    assert_equal_runs(out, reference("ddp", SHORT))


# ------------------------------------------------------------------ node loss
def lose_node(cluster: Cluster, out: Path, a0: Agent, a1: Agent) -> int:
    """SIGKILL node 1 (agent and workers) after step KILL_AT; returns the last checkpoint step then."""
    wait_for_step(out, KILL_AT, [a0, a1])
    assert set(a1.worker_ranks()) & {0, 1}, "node 1 has no worker to lose"
    logs = a0.text() + a1.text()
    assert "(2 ranks, cpu" in logs and "(1 rank," not in logs, \
        "the first rendezvous round did not take both nodes (node 1 started later than last_call_timeout)"
    a1.kill()
    return latest_step(out)


def resumed_at(log: str) -> int:
    lines = [ln for ln in log.splitlines() if ln.startswith("resumed from")]
    assert len(lines) == 1, log[-4000:]
    return int(lines[0].rsplit(" ", 1)[1])


def test_lost_node_replaced_resumes_bit_identically(tmp_path, cluster, reference):
    """--max-restarts 1, fixed 2 nodes: node 1 dies, a replacement agent joins, both restart from the last
    checkpoint; the finished run equals the uninterrupted one."""
    out = tmp_path / "run"
    args = job_args(CONFIGS["ddp"], out, *LONG)
    a0, a1, port = cluster.two_nodes(args, MAX_RESTARTS="1")
    saved = lose_node(cluster, out, a0, a1)
    a2 = cluster.start("node1-replacement", args, NNODES="2", NODE_RANK="1", MASTER_PORT=str(port), MAX_RESTARTS="1",
                       **MULTI)
    assert a0.wait(300) == 0, a0.text()[-6000:]
    assert a2.wait(60) == 0, a2.text()[-6000:]
    logs = a0.text() + a2.text()
    assert resumed_at(logs) >= saved >= 20
    assert "ddp (2 ranks" in logs.split("resumed from")[1]
    assert_equal_runs(out, reference("ddp", LONG))


def dcp_tensors(path: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    flat = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(path, flat)
    state = torch.load(flat, weights_only=False)
    out = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = obj
    walk("", state)
    return out


RESHARD = """
import sys
from pathlib import Path
from sharded_msam_sf.job.config import load_config
from sharded_msam_sf.job.engines import build_engine, init_distributed
from sharded_msam_sf.teardown import close_process_group
cfg = load_config(sys.argv[1], sys.argv[4:])
engine = build_engine(cfg, init_distributed(cfg))
engine.load(Path(sys.argv[2]))
engine.save(Path(sys.argv[3]))
engine.close()
engine = None
close_process_group()
"""


def shrink(cluster: Cluster, out: Path, name: str) -> tuple[Agent, int]:
    """2 nodes x 1 rank under --nnodes 1:2; node 1 is lost; node 0 must finish alone. Returns the
    surviving agent and the step it resumed from."""
    a0, a1, _ = cluster.two_nodes(job_args(CONFIGS[name], out, *LONG), nnodes="1:2", MAX_RESTARTS="1")
    saved = lose_node(cluster, out, a0, a1)
    assert a0.wait(300) == 0, a0.text()[-6000:]
    log = a0.text() + a1.text()
    at = resumed_at(log)
    assert at >= saved >= 20
    after = log.split("resumed from")[1]
    assert f"{ENGINE_NAMES.get(name, name)} (1 rank, cpu, fp32)" in after
    assert "global batch 16 = micro-batch 8 x 1 rank x 2 accumulation step(s)" in after  # the global batch kept
    assert sorted(train_losses(out)) == list(range(1, 121))
    return a0, at


def assert_equals_one_rank_resume(tmp_path: Path, out: Path, name: str, at: int) -> None:
    """The rest of the shrunk run `out` equals a 1-rank run resumed from a copy of its step-`at` checkpoint,
    bit for bit (losses and exported weights)."""
    ctl = tmp_path / "ctl"
    (ctl / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / f"step_{at:06d}", ctl / "checkpoints" / f"step_{at:06d}")
    one_node(tmp_path, "ctl", CONFIGS[name], LONG, nproc=1, extra=["--resume"])
    losses, ctl_losses = train_losses(out), train_losses(ctl)
    assert sorted(ctl_losses) == list(range(at + 1, 121))
    assert {s: losses[s] for s in ctl_losses} == ctl_losses
    assert_same_weights(out, ctl)


def test_elastic_shrink_ddp_equals_uninterrupted(tmp_path, cluster, reference):
    """DDP, --nnodes 1:2, no replacement: node 0 goes on alone (world 2 -> 1, 2 accumulation steps instead
    of 1 rank each) and ends bit-identical to the uninterrupted 2-rank run: (g0 + g1) / 2 is the same
    number whether DDP averages it over ranks or accumulation sums the halves."""
    out = tmp_path / "run"
    shrink(cluster, out, "ddp")
    assert_equal_runs(out, reference("ddp", LONG))


def test_elastic_shrink_fsdp2_reshards_exactly(tmp_path, cluster):
    """FSDP2, --nnodes 1:2, no replacement: node 0 continues alone from the 2-rank DCP checkpoint; the rest
    of the run equals a 1-rank run resumed from a copy of that checkpoint, bit for bit, and the checkpoint
    loaded on 1 rank and saved again is unchanged in every tensor (the optimizer state is exact). (Not
    bit-identical to the uninterrupted run: the sharded norms, for clipping and for the optimizer's
    ||m||, add their partial sums in another order on another world size.)"""
    name = "fsdp2"
    out = tmp_path / "run"
    _, at = shrink(cluster, out, name)
    assert_equals_one_rank_resume(tmp_path, out, name, at)

    # the checkpoint of 2 ranks, loaded on 1 and saved again: every tensor unchanged
    src = out / "checkpoints" / f"step_{at:06d}"
    dst = tmp_path / "resaved"
    env = dict(base_env(), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", RESHARD, str(ROOT / CONFIGS[name]), str(src), str(dst),
                           f"log.out_dir={tmp_path / 'unused'}"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = dcp_tensors(src), dcp_tensors(dst)
    assert a.keys() == b.keys() and any("exp_avg_sq" in k for k in a) and any(".z" in k for k in a)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_elastic_shrink_deepspeed_resumes_through_universal(tmp_path, cluster):
    """ZeRO-2, --nnodes 1:2, no replacement: the restarted rank converts the 2-rank checkpoint into a universal
    one (out_dir/universal/step_N, sealed and verified) and goes on alone; the rest of the run equals a 1-rank
    run resumed from a copy of that checkpoint, bit for bit (the conversion is exact and deterministic)."""
    name = "zero2"
    out = tmp_path / "run"
    a0, at = shrink(cluster, out, name)
    assert "into the universal checkpoint" in a0.text(), a0.text()[-6000:]
    assert (out / "universal" / f"step_{at:06d}" / "manifest.json").is_file()
    assert_equals_one_rank_resume(tmp_path, out, name, at)