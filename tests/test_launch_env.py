"""Rank and launcher discovery (sharded_msam_sf.launch_env) on faked launcher environments.

Each case is the environment a launcher gives one rank (the variables read, plus the ones
that would mislead a naive reader: the batch step's SLURM_PROCID under mpirun, PMI_RANK
next to torchrun's RANK)."""
from __future__ import annotations

import pytest

from sharded_msam_sf import launch_env as L

CASES = {
    "torchrun": ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                  "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"},
                 ("torchrun", 3, 4, 1, "10.0.0.1", 29400)),
    "deepspeed": ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "0",
                   "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29600"},
                  ("deepspeed", 1, 2, 1, "127.0.0.1", 29600)),
    "torchrun under srun": ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x",
                             "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0",
                             "MASTER_ADDR": "node1", "MASTER_PORT": "29500"},
                            ("torchrun", 1, 2, 1, "node1", 29500)),
    "openmpi": ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
                 "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, ("openmpi", 3, 4, 3, "127.0.0.1", 29500)),
    "mpich (hydra)": ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
                      ("mpich", 1, 2, 1, "127.0.0.1", 29500)),
    "mvapich": ({"MV2_COMM_WORLD_RANK": "1", "MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_LOCAL_RANK": "1",
                 "MV2_COMM_WORLD_LOCAL_SIZE": "2"}, ("mvapich", 1, 2, 1, "127.0.0.1", 29500)),
    "pmix (srun --mpi=pmix)": ({"PMIX_RANK": "2", "PMIX_LOCAL_RANK": "0", "SLURM_STEP_NUM_TASKS": "4",
                                "SLURM_PROCID": "2", "SLURM_STEP_ID": "0", "MASTER_ADDR": "node1"},
                               ("pmix", 2, 4, 0, "node1", 29500)),
    "mpirun inside an sbatch allocation": ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                                            "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                                            "SLURM_PROCID": "0", "SLURM_NTASKS": "2"},
                                           ("openmpi", 1, 2, 1, "127.0.0.1", 29500)),
    "srun": ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
              "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_NODES": "2", "MASTER_ADDR": "node1", "MASTER_PORT": "29501"},
             ("slurm", 5, 8, 1, "node1", 29501)),
    "srun on one node": ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_STEPID": "3",
                          "SLURM_NNODES": "1"}, ("slurm", 1, 2, 1, "127.0.0.1", 29500)),
    "sbatch script itself (no step)": ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"},
                                       ("none", 0, 1, 0, "127.0.0.1", None)),
    "plain python": ({}, ("none", 0, 1, 0, "127.0.0.1", None)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_export_reads_the_launcher(name):
    environ, (launcher, rank, world, local, addr, port) = CASES[name]
    env = dict(environ)
    info = L.export(env, mpi_address=lambda: pytest.fail("no MPI broadcast is needed here"))
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == (launcher, rank, world, local)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == (str(rank), str(world), str(local))
    assert env["MASTER_ADDR"] == info.master_addr == addr
    if port is None:  # one process: a free port of its own
        assert int(env["MASTER_PORT"]) > 0 and info.master_port == int(env["MASTER_PORT"])
    else:
        assert env["MASTER_PORT"] == str(port) and info.master_port == port


def test_discover_does_not_write():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2"}
    info = L.discover(env)
    assert (info.launcher, info.rank, info.world_size) == ("mpich", 1, 2)
    assert env == {"PMI_RANK": "1", "PMI_SIZE": "2"}


def test_mpi_across_nodes_takes_rank0_address_over_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    info = L.export(env, mpi_address=lambda: "10.1.2.3")
    assert info.single_node is False and env["MASTER_ADDR"] == "10.1.2.3"


def test_across_nodes_without_an_address_raises():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_STEP_NUM_NODES": "2"}
    with pytest.raises(RuntimeError, match="export MASTER_ADDR"):
        L.export(env)
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(RuntimeError, match="export MASTER_ADDR"):
        L.export(env, mpi_address=lambda: None)  # no mpi4py


@pytest.mark.parametrize("env, match", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 is not in \[0, 2\)"),
    ({"PMI_RANK": "x", "PMI_SIZE": "2"}, "PMI_RANK='x'"),
    ({"RANK": "0"}, "world size"),
])
def test_bad_launcher_values_are_named(env, match):
    with pytest.raises(ValueError, match=match):
        L.discover(env)

