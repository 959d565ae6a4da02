"""The main job with tensor parallelism (``parallel.tp``, engine fsdp2): the GPT at tp=2 on 4 CPU ranks
(dp 2 x tp 2) against the same job at tp=1 on 2 ranks (dp 2, the same global batch), in both SAM modes
(two_pass with 2 accumulation steps); resume under tp=2 against the uninterrupted run; a tp=2
checkpoint resumed at tp=1 (DCP reshards); the config's refusals.

Each job is launched once per module (``jobs``) and read by several tests. The tp=2 one_pass job is
started by the documented line ``NPROC=4 launch/torchrun.sh --config configs/job/fsdp2-tp2-cpu.json``.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sharded_msam_sf.job.config import ConfigError, load_config
from tests.test_train_run import ROOT, _env, _free_port, exported, run_job, train_losses, val_losses

pytestmark = pytest.mark.slow

CONFIG = "configs/job/fsdp2-tp2-cpu.json"
RUN = ("train.max_steps=6", "eval.interval=3", "checkpoint.interval=3", "log.interval=1", "log.plot=false",
       "log.progress=lines")
MODES = {"one_pass": ("optimizer.params.sam_mode=one_pass",),
         "two_pass": ("optimizer.params.sam_mode=two_pass", "train.micro_batch_size=4")}  # 2 accumulation steps
LOSS_TOL = 2e-6      # fp32 round-off of a loss near 5 (the tp ranks sum partial products in another order)
WEIGHT_TOL = 1e-5


def _launch_documented(out, overrides, config: str = CONFIG) -> subprocess.CompletedProcess:
    """``NPROC=4 launch/torchrun.sh --config <config>`` with ``overrides``."""
    args = ["--config", str(ROOT / config), "--override", f"log.out_dir={out}"]
    for o in overrides:
        args += ["--override", o]
    env = dict(_env(), NPROC="4", MASTER_PORT=str(_free_port()))
    proc = subprocess.run(["bash", str(ROOT / "launch/torchrun.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def launched_once(root, launch):
    """name -> (out_dir, stderr): ``launch(name, root / name, get)`` (a CompletedProcess) runs on a name's first
    use; ``get`` lets a job use another's output."""
    done = {}

    def get(name: str):
        if name not in done:
            out = root / name
            done[name] = (out, launch(name, out, get).stderr)
        return done[name]
    return get


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """name -> (out_dir, stderr), each job launched on first use."""
    def launch(name, out, get):
        kind, mode = name.rsplit("-", 1)
        over = RUN + MODES[mode]
        if kind == "tp2" and mode == "one_pass":
            proc = _launch_documented(out, over)
        elif kind == "tp2":
            proc = run_job(CONFIG, out, *over, nproc=4, timeout=300)
        elif kind == "tp1":
            proc = run_job(CONFIG, out, *over, "parallel.tp=1", nproc=2, timeout=300)
        elif kind == "tp2resume":  # from the uninterrupted tp=2 run's step-3 checkpoint, into a fresh out_dir
            ckpt = get(f"tp2-{mode}")[0] / "checkpoints" / "step_000003"
            proc = run_job(CONFIG, out, *over, extra=["--resume", str(ckpt)], nproc=4, timeout=300)
        elif kind == "tp1resume":  # the same checkpoint, resumed at tp=1 on 2 ranks
            ckpt = get(f"tp2-{mode}")[0] / "checkpoints" / "step_000003"
            proc = run_job(CONFIG, out, *over, "parallel.tp=1", extra=["--resume", str(ckpt)], nproc=2, timeout=300)
        else:
            raise KeyError(name)
        return proc
    return launched_once(tmp_path_factory.mktemp("parallel"), launch)


def _max_weight_diff(a, b) -> float:
    wa, wb = exported(a)["model"], exported(b)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape, (k, wa[k].shape, wb[k].shape)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def _max_loss_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    return max(abs(a[k] - b[k]) for k in a)


@pytest.mark.parametrize("mode", MODES)
def test_tp2_trains_as_tp1(jobs, mode):
    """The same trajectory as dp=2 without tensor parallelism: per-step train losses (logged as the mean
    over the dp ranks), eval losses at x, and the exported full x weights."""
    tp2, err2 = jobs(f"tp2-{mode}")
    tp1, _ = jobs(f"tp1-{mode}")
    assert "fsdp2 (4 ranks = dp 2 x tp 2, cpu, fp32)" in err2 and "micro-batch" in err2, err2[-3000:]
    losses = _max_loss_diff(train_losses(tp2), train_losses(tp1))
    vals = _max_loss_diff(val_losses(tp2), val_losses(tp1))
    weights = _max_weight_diff(tp2, tp1)
    print(f"TP2_VS_TP1 {mode}: train loss {losses:.2e}, val loss {vals:.2e}, weights {weights:.2e}")
    assert sorted(train_losses(tp2)) == [1, 2, 3, 4, 5, 6]
    assert losses < LOSS_TOL and vals < LOSS_TOL and weights < WEIGHT_TOL
    assert train_losses(tp2)[6] < train_losses(tp2)[1]


def test_export_holds_the_full_weights(jobs):
    """Gathered over dp and tp: every tensor has the unsharded model's shape and loads into the GPT."""
    from sharded_msam_sf.job.engines import build_model
    cfg = load_config(ROOT / CONFIG, world_size=4)
    model = build_model(cfg)
    sd = exported(jobs("tp2-one_pass")[0])["model"]
    full = model.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: full[k].shape for k in sd}
    model.load_state_dict(sd, strict=False)
    assert set(full) - set(sd) <= {"lm_head.weight"}  # tied to wte.weight


def test_offline_export_of_a_tp2_checkpoint_equals_the_jobs(jobs, tmp_path):
    """``python -m sharded_msam_sf.export`` reads the dp x tp DCP checkpoint without any process group."""
    assert offline_export_diff(jobs("tp2-one_pass")[0], tmp_path) == 0.0


def offline_export_diff(out, tmp_path) -> float:
    """max |diff| between ``python -m sharded_msam_sf.export`` of the job's last (step 6) checkpoint, written
    under tmp_path, and the job's own export."""
    proc = subprocess.run([sys.executable, "-m", "sharded_msam_sf.export", str(out / "checkpoints" / "step_000006"),
                           "--out", str(tmp_path / "export"), "--quiet"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _max_weight_diff(tmp_path, out)


def _resumed(jobs, kind: str, mode: str):
    """(the uninterrupted tp=2 run, the run resumed from its step-3 checkpoint, that run's stderr, the
    uninterrupted run's train losses of steps 4-6)."""
    full, _ = jobs(f"tp2-{mode}")
    part, err = jobs(f"{kind}-{mode}")
    assert "resumed from" in err and "at step 3" in err, err[-3000:]
    return full, part, err, {s: train_losses(full)[s] for s in (4, 5, 6)}


def test_resume_under_tp2_equals_uninterrupted(jobs):
    full, part, _, ref = _resumed(jobs, "tp2resume", "two_pass")
    assert train_losses(part) == ref
    assert val_losses(part) == {6: val_losses(full)[6]}
    assert _max_weight_diff(part, full) == 0.0


def test_tp2_checkpoint_resumes_at_tp1(jobs):
    """DCP reshards the dp x tp checkpoint onto the 1-D mesh; the change is reported."""
    full, part, err, ref = _resumed(jobs, "tp1resume", "one_pass")
    assert "parallel.tp: 2 -> 1" in err, err[-3000:]
    losses = _max_loss_diff(train_losses(part), ref)
    weights = _max_weight_diff(part, full)
    print(f"TP2_CKPT_AT_TP1: train loss {losses:.2e}, weights {weights:.2e}")
    assert losses < LOSS_TOL and weights < WEIGHT_TOL


@pytest.mark.parametrize("overrides, world, message", [
    (("parallel.tp=3",), 6, r"'parallel.tp' \(3\) must divide model.n_head \(4\)"),
    (("parallel.tp=2", "engine.name=deepspeed"), 4, r"'parallel.tp' \(2\) needs engine.name fsdp2; engine "
                                                    r"'deepspeed' has no tensor parallelism"),
    (("parallel.tp=2", "engine.name=ddp"), 4, r"engine 'ddp' has no tensor parallelism"),
    (("parallel.tp=4",), 2, r"'parallel.tp' \(4\) must divide the world size \(2\)"),
    (("model.dropout=0.1",), 4, r"'model.dropout' \(0.1\) must be 0 with parallel.tp \(2\) > 1"),
    (("train.global_batch_size=12",), 4, r"multiple of train.micro_batch_size \(8\) x data-parallel size "
                                         r"\(world size 4 / parallel.tp 2 = 2\) = 16"),
    (("parallel.tp=0",), 4, r"parallel.tp"),
])
def test_bad_parallel_configs_are_refused(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / CONFIG, list(overrides), world_size=world)


def test_tp_batch_split():
    cfg = load_config(ROOT / CONFIG, ["train.micro_batch_size=4"], world_size=8)
    assert (cfg.dp_size, cfg.grad_accum) == (4, 1)
    cfg = load_config(ROOT / CONFIG, ["train.micro_batch_size=4"], world_size=4)
    assert (cfg.dp_size, cfg.grad_accum) == (2, 2)


def test_bad_parallel_config_exits_before_any_process_group(tmp_path):
    env = dict(_env(), WORLD_SIZE="4")
    proc = subprocess.run([sys.executable, "-m", "sharded_msam_sf.train", "--config", str(ROOT / CONFIG),
                           "--override", f"log.out_dir={tmp_path}", "--override", "engine.name=deepspeed"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "config error: config key 'parallel.tp' (2) needs engine.name fsdp2" \
        in proc.stderr, proc.stderr[-3000:]
    assert os.listdir(tmp_path) == []
