"""The world size comes from the launcher's ranks and then from the process group: an sbatch script without
srun is one process whatever SLURM_NTASKS says, a stray WORLD_SIZE and a process group that disagrees with
the launcher are refused (gradients would be averaged over the wrong count). Single process."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from sharded_msam_sf.job.config import env_world_size, load_config
from sharded_msam_sf.job.engines import LaunchMismatch, init_distributed
from tests.harness import free_port

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "GROUP_RANK",
                "CROSS_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID",
                "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE",
                "PMI_SIZE", "PMIX_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for v in _LAUNCH_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    return monkeypatch


def test_sbatch_without_srun_is_one_process(clean_env):
    clean_env.setenv("SLURM_NTASKS", "2")
    clean_env.setenv("SLURM_PROCID", "0")  # the batch script itself: no SLURM_STEP_ID
    assert env_world_size() == 1
    clean_env.setenv("SLURM_STEP_ID", "0")  # under srun: its tasks
    assert env_world_size() == 2


def test_stray_world_size_is_refused(clean_env, tmp_path):
    cfg = load_config(None, [f"log.out_dir={tmp_path}", "engine.name=ddp"], world_size=1)
    clean_env.setenv("WORLD_SIZE", "2")  # no RANK: not a launcher's
    with pytest.raises(LaunchMismatch, match=r"WORLD_SIZE=2 is set, but the launcher \(none\) started 1 rank"):
        init_distributed(cfg)
    assert not dist.is_initialized()


def test_a_process_group_of_another_size_is_refused(clean_env, tmp_path):
    cfg = load_config(None, [f"log.out_dir={tmp_path}", "engine.name=ddp"], world_size=2)
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchMismatch, match=r"the config was validated for 1 rank\(s\), and the launcher \(env\) started 2"):
        init_distributed(load_config(None, [f"log.out_dir={tmp_path}", "engine.name=ddp"], world_size=1))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(LaunchMismatch, match=r"the process group has 1 rank\(s\).*the launcher \(env\) says 2"):
            init_distributed(cfg)
    finally:
        dist.destroy_process_group()
