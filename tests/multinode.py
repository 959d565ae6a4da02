"""Simulated nodes on one machine: torchrun agents (launch/torchrun.sh) on 127.0.0.1.

Each "node" is one agent started in its own session (process group) and its own working
directory, with its output in `<dir>/agent.log`; `kill()` SIGKILLs the agent and all its
workers at once, as a lost machine would. Jobs write to an absolute out_dir (the "shared
file system"). Used by tests/test_multinode.py.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.test_train_run import metrics, train_losses, val_losses  # noqa: F401 (shared with the 1-node job tests)

ROOT = Path(__file__).resolve().parents[1]
AUDIT = ROOT / "tests" / "file_audit"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(audit_dir: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "GROUP_RANK")
           and not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))}
    path = [str(ROOT)] + ([str(AUDIT)] if audit_dir else []) + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", PYTHONPATH=os.pathsep.join(path),
               PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if audit_dir:
        audit_dir.mkdir(parents=True, exist_ok=True)
        env["FILE_AUDIT_DIR"] = str(audit_dir)
    return env


def job_args(config: str, out_dir: Path, *overrides: str) -> list[str]:
    args = ["--config", str(ROOT / config), "--override", f"log.out_dir={out_dir}", "--override", "log.progress=lines"]
    for o in overrides:
        args += ["--override", o]
    return args


_serial = itertools.count()


def _tagged(tag: str) -> list[int]:
    """The pids whose environment holds MULTINODE_TEST_AGENT=tag (an agent and all it started)."""
    want = f"MULTINODE_TEST_AGENT={tag}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if want in (d / "environ").read_bytes().split(b"\0"):
                    found.append(int(d.name))
            except OSError:
                continue
    return found


def kill_tagged(tag: str) -> None:
    for _ in range(3):  # an agent may start a worker while we kill: repeat until none is left
        pids = _tagged(tag)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


class Agent:
    """One torchrun agent (a simulated node) started by launch/torchrun.sh."""

    def __init__(self, workdir: Path, args: list[str], env: dict, **launch: str):
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "agent.log"
        self.tag = f"{os.getpid()}-{next(_serial)}-{workdir}"
        env = dict(env, MULTINODE_TEST_AGENT=self.tag, **launch)
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(["bash", str(ROOT / "launch" / "torchrun.sh"), *args], cwd=workdir, env=env,
                                         stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"agent in {self.dir} still running after {timeout}s:\n{self.text()[-6000:]}")

    def kill(self) -> None:
        """SIGKILL the agent and its workers, as a lost machine. torchrun starts every worker in a session
        of its own, so killing the agent's process group alone would leave them running: the workers are
        found by the TAG variable this agent's processes inherit."""
        kill_tagged(self.tag)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def worker_ranks(self) -> dict[int, int]:
        """{RANK: pid} of this agent's live workers (its python children)."""
        out = {}
        for pid in _tagged(self.tag):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for kv in environ:
                if kv.startswith(b"RANK="):
                    out[int(kv[5:])] = int(pid)
        return out


def wait_listening(port: int, agent: Agent, timeout: float = 60) -> None:
    """Until something accepts on 127.0.0.1:port (the head agent's rendezvous store)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert agent.proc.poll() is None, agent.text()[-4000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"no rendezvous on port {port} after {timeout}s")


def exported(out_dir: Path) -> dict:
    from sharded_msam_sf.weights_io import load_weights
    return load_weights(out_dir / "export")[0]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = exported(a), exported(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k}: max diff {(wa[k] - wb[k]).abs().max().item()}"


def wait_for_step(out: Path, step: int, agents: list[Agent], timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        for a in agents:
            assert a.proc.poll() is None, f"agent in {a.dir} ended early:\n{a.text()[-4000:]}"
        try:
            done = train_losses(out)
        except (OSError, json.JSONDecodeError):
            done = {}
        if done and max(done) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def latest_step(out: Path) -> int:
    return int((out / "checkpoints" / "latest").read_text().split("_")[1])


def writers(audit_dir: Path, under: Path) -> dict[str, set[str]]:
    """{path relative to `under`: ranks that opened it for writing} from the file audit (temp names folded)."""
    found: dict[str, set[str]] = {}
    for f in audit_dir.glob("*.tsv"):
        for line in f.read_text().splitlines():
            rank, path = line.split("\t", 1)
            p = Path(path)
            if under not in p.parents:
                continue
            rel = re.sub(r"(^|/)\.([^/]+)\.tmp\d+$", r"\1\2", str(p.relative_to(under)).replace(".tmp-step_", "step_"))
            # weights_io writes the export under .tmp-<name>-<8 hex> and renames it into place
            rel = re.sub(r"(^|/)\.tmp-([^/]+)-[0-9a-f]{8}(/|$)", r"\1\2\3", rel)
            # TensorBoard names its event file by time, host and pid: fold those
            rel = re.sub(r"(^|/)events\.out\.tfevents\.[^/]+$", r"\1events.out.tfevents.*", rel)
            found.setdefault(rel, set()).add(rank)
    return found
