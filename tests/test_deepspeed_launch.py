"""The mpirun launch path (2 ranks via the venv's mpiexec, mpi4py discovery) and the config errors
of sharded_msam_sf.deepspeed.initialize (raised before any process group or engine exists)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharded_msam_sf.config import ConfigError
from tests.ds_scenarios import shm_op  # noqa: F401
from tests.harness import free_port

ROOT = Path(__file__).resolve().parents[1]


def _mpiexec():
    cand = Path(sys.executable).parent / "mpiexec"
    return str(cand) if cand.exists() else shutil.which("mpiexec")


@pytest.mark.slow
@pytest.mark.usefixtures("shm_op")
@pytest.mark.skipif(_mpiexec() is None, reason="mpiexec not installed (pip install mpich mpi4py)")
def test_mpirun_two_ranks_run_a_step():
    pytest.importorskip("mpi4py")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([_mpiexec(), "-n", "2", sys.executable, str(ROOT / "tests" / "ds_mpi_main.py")],
                          env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "MPI_OK rank=0 world=2" in out and "MPI_OK rank=1 world=2" in out, out[-4000:]


def _mpi_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MODULE", "SCRIPT")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT), NP="2", PYTHON=sys.executable)
    return env


@pytest.mark.slow
@pytest.mark.usefixtures("shm_op")
@pytest.mark.skipif(_mpiexec() is None, reason="mpiexec not installed (pip install mpich mpi4py)")
def test_mpirun_script_runs_the_main_job_by_default(tmp_path):
    """launch/mpirun.sh without MODULE/SCRIPT starts python -m sharded_msam_sf.train (its default
    config: DeepSpeed ZeRO-2 on 2 CPU ranks); --dry-run builds everything and exits."""
    proc = subprocess.run(["bash", str(ROOT / "launch" / "mpirun.sh"), "--override", f"log.out_dir={tmp_path / 'out'}",
                           "--dry-run"], env=_mpi_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "deepspeed (2 ranks, cpu, fp32)" in out, out[-4000:]


@pytest.mark.slow
@pytest.mark.usefixtures("shm_op")
@pytest.mark.skipif(_mpiexec() is None, reason="mpiexec not installed (pip install mpich mpi4py)")
def test_deepspeed_smoke_example_under_mpirun(tmp_path):
    """SCRIPT=examples/deepspeed_smoke.py launch/mpirun.sh: mpi4py rank discovery, ZeRO-3, the x export."""
    pytest.importorskip("mpi4py")
    env = dict(_mpi_env(), SCRIPT=str(ROOT / "examples" / "deepspeed_smoke.py"))
    export = tmp_path / "x"
    proc = subprocess.run(["bash", str(ROOT / "launch" / "mpirun.sh"), "--config",
                           str(ROOT / "configs" / "deepspeed" / "zero3-cpu.json"), "--dist-backend", "gloo",
                           "--steps", "3", "--width", "8", "--export", str(export)],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "done: world=2 DeepSpeedMSAMOptimizer(zero3" in out, out[-4000:]
    from sharded_msam_sf.weights_io import load_weights
    sd, meta = load_weights(export)  # the export directory: model.safetensors + export.json
    assert meta.get("weights") == "x", meta
    assert sorted(sd) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in sd.values())


def _config(**optimizer):
    return {"train_batch_size": 2, "zero_optimization": {"stage": 2}, "optimizer": optimizer}


@pytest.mark.parametrize("optimizer, message", [
    ({"type": "AdamWMSAMScheduleFree", "params": {"rhoo": 1.0}}, r"^optimizer\.params\.rhoo: unknown key \(valid: lr, betas"),
    ({"type": "AdamWMSAMScheduleFree", "params": {"rho": -0.5}}, r"^optimizer\.params\.rho: invalid value -0\.5"),
    ({"type": "AdamWMSAMScheduleFree", "params": {"sam_mode": "once"}}, r"^optimizer\.params\.sam_mode: invalid value 'once'"),
    ({"params": {"lr": 0.001}}, r"^optimizer\.type: missing"),
])
def test_initialize_config_errors_name_the_key(optimizer, message):
    from sharded_msam_sf.deepspeed import initialize
    with pytest.raises(ConfigError, match=message):
        initialize(model=torch.nn.Linear(2, 2), config=_config(**optimizer))


def test_initialize_config_errors_from_a_file_and_deepspeed_keys(tmp_path):
    from sharded_msam_sf.deepspeed import initialize
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_config(type="AdamWMSAMScheduleFree", params={"lr": "high"})))
    with pytest.raises(ConfigError, match=r"^optimizer\.params\.lr: invalid value 'high'"):
        initialize(model=torch.nn.Linear(2, 2), config=str(path))
    with pytest.raises(ConfigError, match=r"^config file not found: "):
        initialize(model=torch.nn.Linear(2, 2), config=str(tmp_path / "nope.json"))
    no_opt = _config()
    del no_opt["optimizer"]
    with pytest.raises(ConfigError, match=r"^optimizer: missing"):
        initialize(model=torch.nn.Linear(2, 2), config=no_opt)
    cfg = _config(type="AdamWMSAMScheduleFree", params={"sam_mode": "two_pass"})
    cfg["gradient_accumulation_steps"] = 2
    with pytest.raises(ConfigError, match=r"^gradient_accumulation_steps: two_pass needs 1"):
        initialize(model=torch.nn.Linear(2, 2), config=cfg)
    cfg = _config(type="AdamWMSAMScheduleFree")
    cfg["zero_optimization"]["elastic_checkpoint"] = True
    with pytest.raises(ConfigError, match=r"^zero_optimization\.elastic_checkpoint"):
        initialize(model=torch.nn.Linear(2, 2), config=cfg)


def test_shipped_configs_validate():
    from sharded_msam_sf.config import optimizer_kwargs_from_config
    from sharded_msam_sf.deepspeed.ds_config import check_deepspeed_config, load_deepspeed_config
    paths = sorted((ROOT / "configs" / "deepspeed").glob("zero*.json"))
    assert len(paths) >= 6, paths
    for p in paths:
        cfg = load_deepspeed_config(str(p))
        kw = optimizer_kwargs_from_config(cfg["optimizer"])
        check_deepspeed_config(cfg, kw.get("sam_mode", "one_pass"))
        assert cfg["zero_optimization"]["stage"] in (1, 2, 3), p
