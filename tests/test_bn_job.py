"""``eval.recalibrate_bn`` in the main job (2 DDP ranks under torchrun): the exported x holds BatchNorm
statistics that are the exact pooled ones of both ranks' recalibration micro-batches at x (the BatchNorm
sits on the embeddings, so its input is known from the exported weights alone); the job's own GPT, which
has no BatchNorm, is refused with a clear error."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.test_train_run import ROOT, _env, _free_port

CONFIG = ROOT / "configs/job/ddp-cpu.json"
OVERRIDES = ["train.max_steps=4", "eval.interval=2", "eval.batches=2", "eval.recalibrate_bn=3",
             "checkpoint.interval=0", "log.interval=2", "model.n_layer=1", "model.n_embd=32", "model.dropout=0.0"]


def _run(out_dir: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--local-addr", "127.0.0.1",
           str(ROOT / "tests/bn_job_main.py"), "--config", str(CONFIG), "--override", f"log.out_dir={out_dir}",
           "--override", "log.progress=lines"]
    for o in OVERRIDES:
        cmd += ["--override", o]
    return subprocess.run(cmd + list(extra), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)


def test_export_holds_the_statistics_at_x(tmp_path):
    proc = _run(tmp_path / "run", 2)
    assert proc.returncode == 0, proc.stderr[-5000:]
    from safetensors.torch import load_file
    from sharded_msam_sf.job.config import load_config
    from sharded_msam_sf.job.data import Batches, load_corpus
    from sharded_msam_sf.job.trainer import recalibration_micro_batches
    sd = load_file(str(tmp_path / "run/export/model.safetensors"))
    cfg = load_config(CONFIG, OVERRIDES, world_size=2)
    corpus = load_corpus(cfg)
    inputs = []
    for rank in range(2):
        for x, _ in recalibration_micro_batches(Batches(corpus, cfg, rank, 2), torch.device("cpu"), 3, 4):
            emb = sd["wte.weight"].double()[x] + sd["wpe.weight"].double()[: x.shape[1]]
            inputs.append(emb.reshape(-1, emb.shape[-1]))
    allx = torch.cat(inputs)
    mean, var = allx.mean(0), allx.var(0, unbiased=True)
    assert torch.allclose(sd["bn.running_mean"].double(), mean, atol=1e-5, rtol=1e-5)
    assert torch.allclose(sd["bn.running_var"].double(), var, atol=1e-5, rtol=1e-5)
    assert int(sd["bn.num_batches_tracked"]) == 6


def test_a_model_without_batchnorm_is_refused():
    import pytest
    from sharded_msam_sf.job.config import ConfigError, load_config
    from sharded_msam_sf.job.engines import build_model
    from sharded_msam_sf.job.trainer import check_recalibration
    cfg = load_config(CONFIG, OVERRIDES, world_size=2)
    with pytest.raises(ValueError, match="'eval.recalibrate_bn' = 3: the model has no BatchNorm layer"):
        check_recalibration(cfg, build_model(cfg))
    with pytest.raises(ConfigError, match="'eval.recalibrate_bn' needs parallel.tp = parallel.pp = 1"):
        load_config(ROOT / "configs/job/fsdp2-tp2-cpu.json", ["eval.recalibrate_bn=2"], world_size=2)
