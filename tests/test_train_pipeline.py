"""The main job with pipeline parallelism (``parallel.pp``, engine fsdp2, ``model.tie_embeddings=false``):
pp=2 on 2 ranks (dp 1, 1F1B, one_pass) against the pp=1 job on 1 rank, and pp=2 x dp=2 on 4 ranks (GPipe,
two_pass) against the pp=1 job on 2 ranks, the same global batch and micro-batches; resume under pp=2
against the uninterrupted run, and of the pp=2 checkpoint at pp=1; the offline export of a pp=2 checkpoint; the stages' parameter names;
the config's refusals.

Each job is launched once per module (``jobs``) and read by several tests. The 4-rank job is started
by the documented line ``NPROC=4 launch/torchrun.sh --config configs/job/fsdp2-pp2-cpu.json``.
"""
from __future__ import annotations

import pytest
import torch

from sharded_msam_sf.job.config import ConfigError, load_config
from tests.test_train_parallel import (_launch_documented, _max_loss_diff, _max_weight_diff, launched_once,
                                      offline_export_diff)
from tests.test_train_run import ROOT, exported, run_job, train_losses, val_losses

pytestmark = pytest.mark.slow

CONFIG = "configs/job/fsdp2-pp2-cpu.json"
RUN = ("train.max_steps=6", "eval.interval=3", "checkpoint.interval=3", "log.interval=1", "log.plot=false",
       "log.progress=lines")
# name -> (ranks, overrides): micro-batch 4 of the global 16, so 4 micro-batches per step at dp 1, 2 at dp 2;
# 3 validation micro-batches at dp 1: the pipeline's eval call is padded with a repeat whose loss is dropped
JOBS = {"pp2-one_pass": (2, ("optimizer.params.sam_mode=one_pass", "parallel.schedule=1f1b", "eval.batches=3")),
        "pp1-one_pass": (1, ("optimizer.params.sam_mode=one_pass", "parallel.pp=1", "eval.batches=3")),
        "pp2dp2-two_pass": (4, ("optimizer.params.sam_mode=two_pass",)),
        "pp1dp2-two_pass": (2, ("optimizer.params.sam_mode=two_pass", "parallel.pp=1"))}
PAIRS = {"one_pass": ("pp2-one_pass", "pp1-one_pass"), "two_pass": ("pp2dp2-two_pass", "pp1dp2-two_pass")}
LOSS_TOL = 2e-6      # fp32 round-off of a loss near 5 (the schedule divides the summed gradients once)
WEIGHT_TOL = 1e-5


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """name -> (out_dir, stderr), each job launched on first use."""
    def launch(name, out, get):
        if name == "pp2dp2-two_pass":
            return _launch_documented(out, RUN + JOBS[name][1], config=CONFIG)
        if name in ("pp2resume", "pp1resume"):  # the uninterrupted pp=2 run's step-3 checkpoint, a fresh out_dir
            ckpt = get("pp2-one_pass")[0] / "checkpoints" / "step_000003"
            nproc, over = JOBS["pp2-one_pass" if name == "pp2resume" else "pp1-one_pass"]
            return run_job(CONFIG, out, *RUN, *over, extra=["--resume", str(ckpt)], nproc=nproc, timeout=300)
        nproc, over = JOBS[name]
        return run_job(CONFIG, out, *RUN, *over, nproc=nproc, timeout=300)
    return launched_once(tmp_path_factory.mktemp("pipeline"), launch)


@pytest.mark.parametrize("mode", PAIRS)
def test_pp2_trains_as_pp1(jobs, mode):
    """The same trajectory as the job without pipelining on the same data-parallel size: per-step train
    losses (logged from the last stage), eval losses at x, and the exported full x weights."""
    pp2, err = jobs(PAIRS[mode][0])
    pp1, _ = jobs(PAIRS[mode][1])
    layout = "2 ranks = pp 2 x dp 1, 1f1b" if mode == "one_pass" else "4 ranks = pp 2 x dp 2, gpipe"
    assert f"fsdp2 ({layout}, cpu, fp32)" in err, err[-3000:]
    losses = _max_loss_diff(train_losses(pp2), train_losses(pp1))
    vals = _max_loss_diff(val_losses(pp2), val_losses(pp1))
    weights = _max_weight_diff(pp2, pp1)
    print(f"PP2_VS_PP1 {mode}: train loss {losses:.2e}, val loss {vals:.2e}, weights {weights:.2e}")
    assert sorted(train_losses(pp2)) == [1, 2, 3, 4, 5, 6] and sorted(val_losses(pp2)) == [3, 6]
    assert losses < LOSS_TOL and vals < LOSS_TOL and weights < WEIGHT_TOL
    assert train_losses(pp2)[6] < train_losses(pp2)[1]


def test_export_holds_every_stages_weights(jobs):
    """Merged on rank 0 from both stages: every tensor of the untied GPT with its full shape, the head its own."""
    from sharded_msam_sf.job.engines import build_model
    model = build_model(load_config(ROOT / CONFIG, world_size=4))
    sd = exported(jobs("pp2dp2-two_pass")[0])["model"]
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert not torch.equal(sd["lm_head.weight"], sd["wte.weight"])
    model.load_state_dict(sd)


def test_offline_export_of_a_pp2_checkpoint_equals_the_jobs(jobs, tmp_path):
    """``python -m sharded_msam_sf.export`` reads the stages' DCP checkpoint (global names) without a process
    group and writes the job's export."""
    assert offline_export_diff(jobs("pp2dp2-two_pass")[0], tmp_path) == 0.0


def test_resume_under_pp2_equals_uninterrupted(jobs):
    full, _ = jobs("pp2-one_pass")
    part, err = jobs("pp2resume")
    assert "resumed from" in err and "at step 3" in err, err[-3000:]
    assert train_losses(part) == {s: train_losses(full)[s] for s in (4, 5, 6)}
    assert val_losses(part) == {6: val_losses(full)[6]}
    assert _max_weight_diff(part, full) == 0.0


def test_pp2_checkpoint_resumes_at_pp1(jobs):
    """The stages' checkpoint (global names) loads into the whole model on 1 rank (DCP reads every stage's keys);
    the change is reported."""
    full, _ = jobs("pp2-one_pass")
    part, err = jobs("pp1resume")
    assert "parallel.pp: 2 -> 1" in err and "at step 3" in err, err[-3000:]
    losses = _max_loss_diff(train_losses(part), {s: train_losses(full)[s] for s in (4, 5, 6)})
    weights = _max_weight_diff(part, full)
    print(f"PP2_CKPT_AT_PP1: train loss {losses:.2e}, weights {weights:.2e}")
    assert losses < LOSS_TOL and weights < WEIGHT_TOL


def test_stages_keep_the_gpts_names_and_compute_its_forward():
    """The stages' parameters are the GPT's, under the GPT's names, each on one stage; running them in order is
    the GPT's forward."""
    from sharded_msam_sf.job.engines import build_model
    from sharded_msam_sf.job.pipeline_parallel import GPTStage
    cfg = load_config(ROOT / CONFIG, ["model.n_layer=4"], world_size=2)
    model = build_model(cfg)
    stages = [GPTStage(model, s, 2) for s in range(2)]
    names = [dict(s.named_parameters()) for s in stages]
    assert set(names[0]) & set(names[1]) == set()
    assert {k: id(v) for n in names for k, v in n.items()} == {k: id(v) for k, v in model.named_parameters()}
    assert {k.split(".")[1] for k in names[1] if k.startswith("blocks.")} == {"2", "3"}
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(stages[1](stages[0](idx)), model(idx), rtol=0, atol=0)
    with pytest.raises(ValueError, match="untied head"):
        GPTStage(build_model(load_config(ROOT / CONFIG, ["model.tie_embeddings=true", "parallel.pp=1"])), 0, 2)


@pytest.mark.parametrize("overrides, world, message", [
    (("engine.name=deepspeed",), 4, r"'parallel.pp' \(2\) needs engine.name fsdp2; engine 'deepspeed' has no "
                                    r"pipeline parallelism"),
    (("engine.name=ddp",), 4, r"engine 'ddp' has no pipeline parallelism"),
    (("parallel.tp=2",), 4, r"'parallel.pp' \(2\) and 'parallel.tp' \(2\): pipeline and tensor parallelism "
                            r"together are not supported"),
    (("parallel.pp=4",), 2, r"'parallel.pp' \(4\) must divide the world size \(2\)"),
    (("model.n_layer=3",), 4, r"'parallel.pp' \(2\) must divide model.n_layer \(3\)"),
    (("model.tie_embeddings=true",), 4, r"'model.tie_embeddings' must be false with parallel.pp \(2\) > 1 \(set "
                                        r"model.tie_embeddings=false\)"),
    (("parallel.schedule=1f1b", "train.micro_batch_size=8"), 4, r"'parallel.schedule': 1f1b needs at least "
                                                                r"parallel.pp \(2\) micro-batches per step, got 1"),
    (("train.global_batch_size=12",), 4, r"multiple of train.micro_batch_size \(4\) x data-parallel size "
                                         r"\(world size 4 / parallel.pp 2 = 2\) = 8"),
    (("parallel.pp=0",), 4, r"parallel.pp"),
    (("parallel.schedule=interleaved",), 4, r"parallel.schedule"),
])
def test_bad_pipeline_configs_are_refused(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / CONFIG, list(overrides), world_size=world)


def test_pp_batch_split():
    cfg = load_config(ROOT / CONFIG, world_size=4)
    assert (cfg.dp_size, cfg.grad_accum) == (2, 2)
    cfg = load_config(ROOT / CONFIG, world_size=8)
    assert (cfg.dp_size, cfg.grad_accum) == (4, 1)
