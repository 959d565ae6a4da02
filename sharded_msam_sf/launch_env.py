"""Rank, world size, local rank and rendezvous address from whichever launcher started us.

The launchers, in the order they are tried (the first that matches wins):

=============  ======================================  =========================================
launcher       rank / world / local rank               how it is recognised
=============  ======================================  =========================================
torchrun       RANK / WORLD_SIZE / LOCAL_RANK          RANK and TORCHELASTIC_RUN_ID or GROUP_RANK
deepspeed      RANK / WORLD_SIZE / LOCAL_RANK          RANK and CROSS_RANK (deepspeed's launch.py)
env            RANK / WORLD_SIZE / LOCAL_RANK          RANK set by anything else (a harness, a user)
openmpi        OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}  mpirun/mpiexec of Open MPI
mpich          PMI_RANK / PMI_SIZE / MPI_LOCALRANKID   mpiexec of MPICH (Hydra) or Intel MPI
mvapich        MV2_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}   mpirun_rsh of MVAPICH2
pmix           PMIX_RANK / PMIX_SIZE / PMIX_LOCAL_RANK a PMIx launcher (prterun, srun --mpi=pmix)
slurm          SLURM_PROCID / SLURM_STEP_NUM_TASKS     srun (SLURM_STEP_ID set: not the batch
               (else SLURM_NTASKS) / SLURM_LOCALID     script itself, whose SLURM_PROCID is 0)
none           0 / 1 / 0                               plain ``python``
=============  ======================================  =========================================

An explicit ``RANK`` wins over everything (``srun torchrun ...`` and ``mpirun torchrun ...``
run under torchrun's ranks); the MPI variables win over Slurm's, because ``mpirun`` inside
an allocation leaves the batch step's ``SLURM_PROCID=0`` in every rank's environment.

The rendezvous address: ``MASTER_ADDR``/``MASTER_PORT`` when set (torchrun and the
deepspeed launcher set them). Otherwise, for an MPI launch not known to fit on one node,
rank 0's address broadcast with mpi4py (what DeepSpeed's ``mpi_discovery`` does); a launch
known to span several nodes with no such address raises and says to set ``MASTER_ADDR``;
anything else gets ``127.0.0.1``. The port defaults to 29500 (a free port when there is
one process).

:func:`discover` reads an environment (``os.environ`` by default) and returns a
:class:`LaunchEnv`; :func:`export` writes ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` for ``init_process_group("env://")``
and ``deepspeed.init_distributed``.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Callable, MutableMapping, Optional, Tuple

__all__ = ["LaunchEnv", "LAUNCHERS", "MPI_LAUNCHERS", "DEFAULT_PORT", "discover", "export", "free_port"]

DEFAULT_PORT = 29500

def _has(*names: str) -> Callable[[MutableMapping[str, str]], bool]:
    return lambda env: all(n in env for n in names)


def _has_rank_and_any(*names: str) -> Callable[[MutableMapping[str, str]], bool]:
    return lambda env: "RANK" in env and any(n in env for n in names)


_TORCH_VARS = (("RANK",), ("WORLD_SIZE",), ("LOCAL_RANK",), ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"))
# (name, does it match this environment?, the variables of (rank, world size, local rank, local
# world size), each a list of names tried in turn); the order is the rule: the first match wins
LAUNCHERS = (
    ("torchrun", _has_rank_and_any("TORCHELASTIC_RUN_ID", "GROUP_RANK"), _TORCH_VARS),
    ("deepspeed", _has_rank_and_any("CROSS_RANK"), _TORCH_VARS),
    ("env", _has("RANK"), _TORCH_VARS),
    ("openmpi", _has("OMPI_COMM_WORLD_RANK"),
     (("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",), ("OMPI_COMM_WORLD_LOCAL_RANK",),
      ("OMPI_COMM_WORLD_LOCAL_SIZE",))),
    ("mpich", _has("PMI_RANK"), (("PMI_RANK",), ("PMI_SIZE",), ("MPI_LOCALRANKID",), ("MPI_LOCALNRANKS",))),
    ("mvapich", _has("MV2_COMM_WORLD_RANK"),
     (("MV2_COMM_WORLD_RANK",), ("MV2_COMM_WORLD_SIZE",), ("MV2_COMM_WORLD_LOCAL_RANK",),
      ("MV2_COMM_WORLD_LOCAL_SIZE",))),
    ("pmix", _has("PMIX_RANK"), (("PMIX_RANK",), ("PMIX_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
                                 ("PMIX_LOCAL_RANK", "SLURM_LOCALID"), ("PMIX_LOCAL_SIZE",))),
    ("slurm", lambda env: "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env),
     (("SLURM_PROCID",), ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"), ("SLURM_LOCALID",), ())),
)
MPI_LAUNCHERS = ("openmpi", "mpich", "mvapich", "pmix")


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as its launcher says."""

    launcher: str                  # a name of LAUNCHERS, or "none"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: Optional[int]  # None: the launcher does not say
    master_addr: Optional[str]       # None: not set; export() decides
    master_port: Optional[int]
    single_node: Optional[bool]      # every rank on this node (None: unknown)


def _first(env: MutableMapping[str, str], names: Tuple[str, ...], what: str, launcher: str) -> Optional[int]:
    for n in names:
        if n in env:
            try:
                return int(env[n])
            except ValueError:
                raise ValueError(f"{n}={env[n]!r} (the {what} set by {launcher}) is not an integer") from None
    return None


def _single_node(launcher: str, env: MutableMapping[str, str], world: int, local_world: Optional[int]) -> Optional[bool]:
    if world == 1:
        return True
    if local_world is not None:
        return local_world == world
    if launcher == "slurm":
        nodes = env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES"))
        return None if nodes is None else nodes == "1"
    return None


def discover(environ: Optional[MutableMapping[str, str]] = None) -> LaunchEnv:
    """The launcher and this process's place in the job, read from ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    for name, matches, (rank_v, world_v, local_v, local_world_v) in LAUNCHERS:
        if not matches(env):
            continue
        rank = _first(env, rank_v, "rank", name)
        world = _first(env, world_v, "world size", name)
        if world is None:
            raise ValueError(f"{rank_v[0]} is set ({name}) but none of {list(world_v)} gives the world size")
        local = _first(env, local_v, "local rank", name)
        local_world = _first(env, local_world_v, "local world size", name)
        if not 0 <= rank < world:
            raise ValueError(f"{rank_v[0]}={rank} is not in [0, {world}) ({name})")
        break
    else:
        name, rank, world, local, local_world = "none", 0, 1, 0, 1
    single = _single_node(name, env, world, local_world)
    if local is None:  # a launcher that does not say: the rank itself on one node, else 0
        local = rank if single else 0
    port = env.get("MASTER_PORT")
    return LaunchEnv(launcher=name, rank=rank, world_size=world, local_rank=local, local_world_size=local_world,
                     master_addr=env.get("MASTER_ADDR"), master_port=int(port) if port else None,
                     single_node=single)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _mpi_rank0_address() -> Optional[str]:
    """Rank 0's address, broadcast over MPI (mpi4py), as DeepSpeed's mpi_discovery does."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    addr = None
    if comm.Get_rank() == 0:  # the first address of `hostname -I`, as DeepSpeed takes it
        import subprocess
        try:
            addr = subprocess.check_output(["hostname", "-I"], text=True).split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            addr = socket.gethostbyname(socket.gethostname())
    return comm.bcast(addr, root=0)


def export(environ: Optional[MutableMapping[str, str]] = None, *, mpi_address: Callable[[], Optional[str]] = None
           ) -> LaunchEnv:
    """:func:`discover`, then set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` in ``environ`` (values already there are kept)."""
    env = os.environ if environ is None else environ
    info = discover(env)
    addr = info.master_addr
    if addr is None and info.single_node is not True and info.launcher in MPI_LAUNCHERS:
        addr = (mpi_address or _mpi_rank0_address)()
    if addr is None and info.single_node is False:
        raise RuntimeError(
            f"MASTER_ADDR is not set and the {info.world_size} ranks started by {info.launcher} span "
            "several nodes: export MASTER_ADDR=<rank 0's host> (and MASTER_PORT) before launching "
            "(launch/mpirun.sh and launch/slurm.sbatch do)")
    if addr is None:
        addr = "127.0.0.1"
    port = info.master_port
    if port is None:
        port = free_port() if info.world_size == 1 else DEFAULT_PORT
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(info.rank), str(info.world_size), str(info.local_rank)
    if info.local_world_size is not None:
        env.setdefault("LOCAL_WORLD_SIZE", str(info.local_world_size))
    env["MASTER_ADDR"], env["MASTER_PORT"] = addr, str(port)
    return LaunchEnv(info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size, addr, port,
                     info.single_node)
