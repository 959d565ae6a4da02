"""What the job shows and records (issue 17): tqdm progress, plain lines for logs, TensorBoard scalars."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree
from sharded_msam_sf.job.config import ConfigError, load_config
from sharded_msam_sf.job.progress import Progress, optimizer_scalars

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ progress
def test_lines_mode_writes_one_plain_line_per_update(tmp_path):
    out = io.StringIO()
    p = Progress(True, tmp_path, "lines", 0, 20, 100, stream=out)
    p.train_time, p.steps_timed = 2.0, 10
    p.update(10, 2.5)
    p.message("step 10: val loss 2.4000 (eval mode, x)")
    p.close()
    assert out.getvalue() == ("step 10/20 | loss 2.5000 | 500 tok/s | elapsed 00:02 | ETA 00:02\n"
                              "step 10: val loss 2.4000 (eval mode, x)\n")
    assert "\r" not in out.getvalue()


def test_bar_mode_is_a_tqdm_bar_with_messages_above_it(tmp_path):
    out = io.StringIO()
    p = Progress(True, tmp_path, "bar", 5, 20, 100, stream=out)
    p.train_time, p.steps_timed = 1.0, 1
    p.update(6, 3.25)
    p.message("checkpoint: x")
    p.update(20, 3.0)
    p.close()
    text = out.getvalue()
    assert "\r" in text and "6/20" in text and "20/20" in text and "100%" in text
    assert "loss 3.2500" in text and "loss 3.0000" in text and "checkpoint: x\n" in text


def test_auto_mode_and_other_ranks(tmp_path):
    assert Progress(True, tmp_path, "auto", 0, 10, 1, stream=io.StringIO()).mode == "lines"  # not a TTY
    for enabled, mode in ((False, "lines"), (True, "none")):  # ranks > 0; log.progress=none
        out = io.StringIO()
        p = Progress(enabled, tmp_path, mode, 0, 10, 1, stream=out)
        p.update(1, 1.0)
        p.message("hello")
        assert out.getvalue() == ""


# ------------------------------------------------------------------ optimizer scalars
def _m_norm(opt) -> float:
    return math.sqrt(sum(float(s["exp_avg"].double().pow(2).sum()) for s in opt.state.values()))


@pytest.mark.parametrize("rho", [0.05, 0.0])
def test_optimizer_scalars_one_pass(rho):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    opt = AdamWMSAMScheduleFree([w], lr=0.01, warmup_steps=4, rho=rho, sam_mode="one_pass")
    opt.train()
    for k in range(1, 3):
        w.grad = torch.randn(5, 3)
        opt.step()
        got = optimizer_scalars(opt)
        assert got["optimizer/lr"] == pytest.approx(0.01 * k / 4)
        if rho:
            assert got["optimizer/m_norm"] == pytest.approx(_m_norm(opt), rel=1e-6)
            assert got["optimizer/ascent_scale"] == pytest.approx(-rho / _m_norm(opt), rel=1e-6)
        else:
            assert got["optimizer/m_norm"] is None and got["optimizer/ascent_scale"] == 0.0


def test_optimizer_scalars_two_pass_after_move_to_ascent():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    opt = AdamWMSAMScheduleFree([w], lr=0.01, rho=0.1, sam_mode="two_pass")
    opt.train()
    g = torch.randn(4)
    w.grad = g.clone()
    opt.move_to_ascent()
    got = optimizer_scalars(opt)
    assert got["optimizer/ascent_scale"] > 0  # SAM climbs: +rho/||m||
    assert got["optimizer/ascent_scale"] * got["optimizer/m_norm"] == pytest.approx(0.1)


# ------------------------------------------------------------------ log.tensorboard
def test_tensorboard_on_needs_the_package(monkeypatch):
    import sharded_msam_sf.job.config as C
    assert load_config(None, world_size=1).log.tensorboard is True  # installed here: on by default
    monkeypatch.setattr(C, "_tensorboard_installed", lambda: False)
    assert load_config(None, world_size=1).log.tensorboard is False
    with pytest.raises(ConfigError, match=r"log\.tensorboard.*pip install"):
        load_config(None, ["log.tensorboard=true"], world_size=1)


def _events(out_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out_dir / "tensorboard"))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_resume_purges_the_events_after_the_checkpoint(tmp_path):
    from sharded_msam_sf.job.progress import TensorBoard
    board = TensorBoard(True, tmp_path, 0)
    for k in range(1, 6):  # a run that dies at step 5 after its checkpoint at step 3
        board.scalars(k, {"train/loss": float(k), "val/loss": None})
    board.close()
    board = TensorBoard(True, tmp_path, 3)  # resumed at step 3
    board.scalars(4, {"train/loss": 40.0})
    board.close()
    assert _events(tmp_path) == {"train/loss": {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0}}
    assert TensorBoard(False, tmp_path / "off", 0).writer is None and not (tmp_path / "off").exists()


TRACKERS = ["--override", "log.wandb=true", "--override", "log.wandb_mode=offline", "--override", "log.mlflow=true"]


def _run_job(config: str, tmp: Path) -> dict:
    """One rank, 4 steps, every scalar per step; the DDP run also writes offline W&B and local MLflow runs."""
    out = tmp / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", WANDB_SILENT="true")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS",
                "MLFLOW_TRACKING_URI", "WANDB_MODE"):
        env.pop(var, None)
    trackers = TRACKERS if "ddp" in config else []
    proc = subprocess.run([sys.executable, "-m", "sharded_msam_sf.train", "--config",
                           str(ROOT / config), "--override", f"log.out_dir={out}",
                           "--override", "train.max_steps=4", "--override", "eval.interval=2",
                           "--override", "log.interval=1", "--override", "log.progress=lines",
                           "--override", "log.tensorboard=true", "--override", "log.plot=false",
                           "--override", "checkpoint.export=false", *trackers],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {"out": out, "stderr": proc.stderr, "events": _events(out), "recs": recs}


@pytest.fixture(scope="module")
def job_runs(tmp_path_factory):
    cache: dict = {}

    def get(config: str) -> dict:
        if config not in cache:
            cache[config] = _run_job(config, tmp_path_factory.mktemp("job"))
        return cache[config]
    return get


@pytest.mark.parametrize("config", ["configs/job/ddp-cpu.json", "configs/job/zero1-cpu.json"])
def test_job_writes_the_scalars_to_tensorboard(job_runs, config):
    """One rank, 4 steps: every scalar per step, matching metrics.jsonl (under DeepSpeed read
    through the facade from the plain optimizer's param groups)."""
    run = job_runs(config)
    assert "step 4/4 | loss" in run["stderr"]  # log.progress=lines
    assert "| grad norm " in run["stderr"] and "| peak MiB per rank " in run["stderr"]
    ev, recs = run["events"], run["recs"]
    assert set(ev) == {"train/loss", "val/loss", "optimizer/lr", "optimizer/m_norm", "optimizer/ascent_scale",
                       "optimizer/skipped_steps", "perf/tokens_per_s", "train/grad_norm",
                       "memory/rank0_peak_mib"}, set(ev)
    for tag in set(ev) - {"val/loss"}:
        assert sorted(ev[tag]) == [1, 2, 3, 4], (tag, ev[tag])
    assert recs[0] == {"step": 0, "config": load_config(ROOT / config, [
        f"log.out_dir={run['out']}", "train.max_steps=4", "eval.interval=2", "log.interval=1", "log.progress=lines",
        "log.tensorboard=true", "log.plot=false", "checkpoint.export=false",
        *(TRACKERS[1::2] if "ddp" in config else [])], world_size=1).to_dict()}
    train = {r["step"]: r["train_loss"] for r in recs if "train_loss" in r}
    val = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    norms = {r["step"]: r["grad_norm"] for r in recs if "train_loss" in r}
    assert ev["train/loss"] == pytest.approx(train, rel=1e-6)  # one rank, log.interval=1: the same losses
    assert ev["train/grad_norm"] == pytest.approx(norms, rel=1e-6) and all(v > 0 for v in norms.values())
    assert all(len(r["peak_mem_mib_per_rank"]) == 1 and r["peak_mem_mib_per_rank"][0] > 0
               for r in recs if "train_loss" in r)
    assert ev["val/loss"] == pytest.approx(val, rel=1e-6) and sorted(val) == [2, 4]
    assert ev["optimizer/lr"] == pytest.approx({k: 0.003 * k / 20 for k in range(1, 5)})  # 20 warm-up steps
    for k in range(1, 5):
        assert ev["optimizer/m_norm"][k] > 0
        assert ev["optimizer/ascent_scale"][k] * ev["optimizer/m_norm"][k] == pytest.approx(-0.05, rel=1e-5)
        assert ev["optimizer/skipped_steps"][k] == 0 and ev["perf/tokens_per_s"][k] > 0


def test_grad_norm_is_the_same_global_norm_under_ddp_and_deepspeed(job_runs):
    """The two configs differ only in the engine: torch's clip_grad_norm_ (DDP) and DeepSpeed's
    get_global_grad_norm() (ZeRO-1) report the same pre-clip norm of the same gradients, every step."""
    ddp = job_runs("configs/job/ddp-cpu.json")["events"]["train/grad_norm"]
    zero = job_runs("configs/job/zero1-cpu.json")["events"]["train/grad_norm"]
    assert ddp == pytest.approx(zero, rel=1e-4) and sorted(ddp) == [1, 2, 3, 4]


def test_wandb_offline_and_mlflow_local_runs_hold_the_config_and_scalars(job_runs, monkeypatch):
    run = job_runs("configs/job/ddp-cpu.json")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = run["out"]
    offline = list((out / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb")), list((out / "wandb").iterdir())
    import mlflow
    mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
    (r,) = mlflow.search_runs(experiment_names=["sharded-msam-sf"], output_format="list")
    assert r.data.params["engine.name"] == "ddp" and r.data.params["optimizer.params.rho"] == "0.05"
    history = mlflow.MlflowClient().get_metric_history(r.info.run_id, "train_grad_norm")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert {m.step: m.value for m in history} == pytest.approx(run["events"]["train/grad_norm"], rel=1e-6)
    assert r.data.metrics["final_val_loss"] == pytest.approx(run["recs"][-1]["summary"]["val_loss"])
