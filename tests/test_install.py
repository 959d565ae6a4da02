"""Install and launch like the stock tools (issue 24): shipped configs and their names, the console
commands, --print-config / --list-configs / --help, and the checks that fail before any process group
(printed by rank 0 only). The wheel route and the stock DeepSpeed launcher: tests/test_wheel.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sharded_msam_sf import shipped_configs

ROOT = Path(__file__).resolve().parents[1]
_LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID")


def clean_env(root: Path) -> dict:
    """This environment without any launcher's variables, importing the tree under test."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(PYTHONPATH=str(root), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    return env


# ------------------------------------------------------------------ shipped configs: one set of files
def test_repo_configs_is_the_package_folder():
    link = ROOT / "configs"
    assert link.is_symlink() and link.resolve() == shipped_configs.CONFIG_DIR
    assert sorted(p.name for p in (ROOT / "configs/job").glob("*.json")) == \
        sorted(p.name for p in (shipped_configs.CONFIG_DIR / "job").glob("*.json"))
    assert {"default", "zero3-cpu", "ddp-cpu"} <= set(shipped_configs.shipped("job"))
    assert {"zero2-cpu", "zero3-cpu"} <= set(shipped_configs.shipped("deepspeed"))


@pytest.mark.parametrize("name,kind,stem", [("default", "job", "default"), ("default.json", "job", "default"),
                                            ("job/zero3-cpu", "job", "zero3-cpu"),
                                            ("zero3-cpu", "job", "zero3-cpu"),
                                            ("deepspeed/zero3-cpu", "deepspeed", "zero3-cpu"),
                                            ("configs/job/fsdp2-cpu.json", "job", "fsdp2-cpu")])
def test_names_resolve_to_the_shipped_files(name, kind, stem, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: names, not paths
    assert shipped_configs.resolve(name) == shipped_configs.CONFIG_DIR / kind / f"{stem}.json"


def test_an_existing_path_wins_and_an_unknown_name_lists_the_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").write_text("{}")
    assert shipped_configs.resolve("default") == Path("default")
    with pytest.raises(FileNotFoundError, match=r"not a shipped config name: job configs ddp-cpu, default"):
        shipped_configs.resolve("nope")
    with pytest.raises(FileNotFoundError):
        shipped_configs.resolve("elsewhere/default")


def _main(args, capsys) -> tuple:
    """train.main in this process (no process group starts on these routes): (exit code, stdout, stderr)."""
    from sharded_msam_sf.train import main
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """Outside the repository, no launcher in the environment."""
    monkeypatch.chdir(tmp_path)
    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_list_print_config_and_help_from_outside_the_repo(outside, capsys):
    code, out, _ = _main(["--list-configs"], capsys)
    assert code == 0 and "  default\n" in out and "deepspeed/zero2-cpu" in out
    code, out, err = _main(["--config", "zero3-cpu", "--override", "train.max_steps=7", "--print-config"], capsys)
    assert code == 0, err
    cfg = json.loads(out)
    assert cfg["engine"]["zero_stage"] == 3 and cfg["train"]["max_steps"] == 7
    default = json.loads(_main(["--print-config"], capsys)[1])  # no --config: the shipped default
    assert default == json.loads(_main(["--config", str(ROOT / "configs/job/default.json"), "--print-config"],
                                       capsys)[1])
    assert default["engine"]["name"] == "deepspeed" and default["optimizer"]["params"]["rho"] == 0.05
    with pytest.raises(SystemExit):
        _main(["--help"], capsys)
    text = capsys.readouterr().out
    assert "msam-train" in text and "--config default" in text
    assert "configs/" not in text and "launch/" not in text  # no repository paths


def test_train_py_as_a_path_and_local_rank_from_the_stock_launcher(tmp_path):
    env = clean_env(ROOT)
    p = subprocess.run([sys.executable, str(ROOT / "sharded_msam_sf/train.py"), "--local_rank=1", "--config",
                        "ddp-cpu", "--print-config"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["engine"]["name"] == "ddp"


# ------------------------------------------------------------------ fail fast, and once
def test_a_missing_library_is_named_with_its_extra_by_rank_0_only(outside, capsys, monkeypatch):
    """A config that exports needs safetensors: without it the job refuses before any process group
    (it used to train the whole run and then crash)."""
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` raises ImportError
    args = ["--config", "default", "--override", f"log.out_dir={outside / 'run'}"]
    results = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        results.append(_main(args, capsys))
    assert [r[0] for r in results] == [2, 2]
    assert "checkpoint.export" in results[0][2] and "pip install 'sharded_msam_sf[train]'" in results[0][2]
    assert results[1][2] == ""  # printed once, by rank 0
    assert not (outside / "run").exists()
    monkeypatch.setenv("RANK", "0")
    code, _, err = _main(args + ["--override", "checkpoint.export=false", "--override", "train.max_steps=1",
                                 "--print-config"], capsys)
    assert code == 0, err


def test_cuda_without_a_gpu_is_a_config_error(outside, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    code, _, err = _main(["--config", "ddp-cpu", "--override", "engine.device=cuda"], capsys)
    assert code == 2 and "config error: config key 'engine.device' is 'cuda'" in err and "engine.device=cpu" in err


def test_a_stale_extension_lock_is_named_not_waited_on(outside, capsys, monkeypatch):
    from sharded_msam_sf.extension_lock import main as lock_main
    from sharded_msam_sf.extension_lock import stale_locks
    root = outside / "ext"
    lock = root / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh = root / "py311_cpu" / "building_now" / "lock"
    for f in (lock, fresh):
        f.parent.mkdir(parents=True)
        f.write_text("")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert stale_locks(root) == [lock] and stale_locks(root, older_than_s=0) == sorted([lock, fresh])
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    code, _, err = _main(["--config", "default", "--override", f"log.out_dir={outside / 'run'}"], capsys)
    assert code == 2 and f"rm {lock}" in err, err
    assert lock_main([]) == 1 and str(lock) in capsys.readouterr().err
    lock.unlink()
    assert lock_main([]) == 0


def test_thread_hint_only_when_the_thread_count_is_left_to_torch(monkeypatch):
    from sharded_msam_sf.job import preflight
    from sharded_msam_sf.job.config import load_config
    cfg = load_config(shipped_configs.resolve("ddp-cpu"), world_size=2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert preflight.thread_hint(cfg, 2) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    hint = preflight.thread_hint(cfg, 2)
    assert hint.startswith("hint: OMP_NUM_THREADS is not set") and "2 local rank(s)" in hint
