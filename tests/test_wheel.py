"""The wheel route (issue 24): ``pip wheel`` of the repository, installed non-editable into a fresh venv,
used from a directory that is not the repository: the shipped configs are inside the package, the console
commands exist, ``msam-train`` writes its export, plot and TensorBoard logs, and the stock DeepSpeed route
(``register()`` + ``deepspeed.initialize(args=...)``, README's DeepSpeed section) runs under the stock
``deepspeed`` launcher with that install.

The venv reuses this environment's installed packages through a ``.pth`` line (torch is not downloaded a
second time); only the wheel is installed into it, without dependencies. The full route from an empty venv
(``pip install torch==2.13.0`` + the wheel with its extras) is the same commands; its measurement is in
the issue's closing note."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sharded_msam_sf.launch_env import free_port

ROOT = Path(__file__).resolve().parents[1]
_DROP = ("PYTHONPATH", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PMI_SIZE", "PMI_RANK",
         "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "SLURM_NTASKS", "SLURM_PROCID", "TORCHELASTIC_RUN_ID",
         "VIRTUAL_ENV")


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in _DROP}  # no PYTHONPATH: nothing of the tree is seen
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300, env=env)
    (whl,) = (tmp / "dist").glob("sharded_msam_sf-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(whl)],
                   check=True, capture_output=True, timeout=300, env=env)
    # then this environment's packages, after the venv's own (written after the install: pip would otherwise
    # take this environment's editable sharded_msam_sf for the wheel)
    (Path(site) / "shared_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu")
    work = tmp / "elsewhere"
    work.mkdir()
    return {"venv": venv, "py": py, "site": Path(site), "env": env, "cwd": work, "wheel": whl}


def _run(cmd, w, timeout=300):
    return subprocess.run([str(c) for c in cmd], cwd=w["cwd"], env=w["env"], capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_ships_configs_and_console_commands(wheel_venv):
    w = wheel_venv
    import zipfile
    names = zipfile.ZipFile(w["wheel"]).namelist()
    assert "sharded_msam_sf/configs/job/default.json" in names and \
        "sharded_msam_sf/configs/deepspeed/zero2-cpu.json" in names
    for cmd in ("msam-train", "msam-export", "msam-checkpoint", "msam-simulate"):
        assert (w["venv"] / "bin" / cmd).is_file(), cmd
    listed = _run(["msam-train", "--list-configs"], w)  # the configs of the wheel's copy, not the tree's
    assert listed.returncode == 0 and str(w["site"] / "sharded_msam_sf/configs/job") in listed.stdout
    assert "  default\n" in listed.stdout and "deepspeed/zero3-cpu" in listed.stdout


def test_msam_train_writes_export_plot_and_tensorboard(wheel_venv):
    w = wheel_venv
    out = w["cwd"] / "run"
    p = _run(["msam-train", "--config", "ddp-cpu", "--override", "train.max_steps=4", "--override",
              "eval.interval=0", "--override", "log.interval=2", "--override", "log.tensorboard=true",
              "--override", f"log.out_dir={out}"], w)
    assert p.returncode == 0, p.stderr[-4000:]
    assert (out / "export/model.safetensors").is_file() and (out / "loss.png").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["config"]["engine"]["name"] == "ddp"  # the config, first in the records
    logged = [r for r in recs if "train_loss" in r]
    assert [r["step"] for r in logged] == [2, 4] and all(r["grad_norm"] > 0 for r in logged)
    assert all(len(r["peak_mem_mib_per_rank"]) == 1 for r in logged)


@pytest.mark.slow
def test_stock_deepspeed_initialize_under_the_stock_launcher(wheel_venv):
    """README's DeepSpeed section with the wheel: register(), then deepspeed.initialize(args=...) with
    --deepspeed_config, started by the stock `deepspeed` launcher (which passes --local_rank) on 2 ranks."""
    w = wheel_venv
    launcher = Path(sys.executable).with_name("deepspeed")  # the stock launcher script, run by the venv's python
    ds_config = w["site"] / "sharded_msam_sf/configs/deepspeed/zero2-cpu.json"
    p = _run([w["py"], launcher, "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", free_port(),
              ROOT / "examples/deepspeed_stock.py", "--deepspeed_config", ds_config, "--steps", "40"], w)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("eval-mode (x) loss")]
    assert len(line) == 1, p.stdout[-2000:]  # rank 0 only
    end, start = (float(t.strip("()")) for t in line[0].split() if t.strip("()").replace(".", "").isdigit())
    assert end < start, line
