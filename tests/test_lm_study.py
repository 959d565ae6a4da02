"""benchmarks/lm_study.py: the quick grid end to end (tuning, seeds, budgets, flatness, resume, report) and the
GPT-124M preset at a tiny size under torchrun on 2 CPU ranks (DDP, bf16 autocast, a token file)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "lm_study.py"
sys.path.insert(0, str(ROOT / "benchmarks"))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(cmd, timeout=240):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


def test_plan_cells_budgets():
    """Where every kind of optimizer is measured: anytime runs once to the largest budget, two_pass at N/2
    steps (grads) and N steps (steps, where N <= largest/2), cosine ones once per budget."""
    from lm_study import OPTIMIZERS, plan_cells, warmup_cosine
    assert plan_cells(OPTIMIZERS["sf_adamw"], [100, 300]) == [
        (300, [("grads", 100, 100), ("steps", 100, 100), ("grads", 300, 300), ("steps", 300, 300)])]
    assert plan_cells(OPTIMIZERS["msam_sf_2p"], [100, 300]) == [
        (150, [("grads", 100, 50), ("grads", 300, 150), ("steps", 100, 100)])]
    assert plan_cells(OPTIMIZERS["adamw"], [100, 300]) == [
        (100, [("grads", 100, 100), ("steps", 100, 100)]), (300, [("grads", 300, 300), ("steps", 300, 300)])]
    # the comparisons: the smallest budget only
    assert plan_cells(OPTIMIZERS["psgd_kron"], [100, 300]) == [(100, [("grads", 100, 100), ("steps", 100, 100)])]
    assert plan_cells(OPTIMIZERS["msam_sf_1p_seed"], [100, 300]) == [(100, [("grads", 100, 100), ("steps", 100, 100)])]
    f = warmup_cosine(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_quick_grid_and_resume(tmp_path):
    out = tmp_path / "q"
    p = _run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    tuning, rows = summary["tuning"], summary["rows"]
    from lm_study import OPTIMIZERS
    assert set(tuning) == set(OPTIMIZERS)
    assert tuning["msam_sf_1p_seed"]["chosen"] == tuning["msam_sf_1p"]["chosen"]  # the ablation flips the sign only
    sf_lr = tuning["sf_adamw"]["chosen"]["lr"]
    for name in ("msam_sf_1p", "msam_sf_2p", "sam_sf", "hb_msam"):  # rho on its grid at SF-AdamW's chosen lr
        tried = tuning[name]["tried"]
        assert [t["hp"] for t in tried] == [{"lr": sf_lr, "rho": r} for r in OPTIMIZERS[name].rho_grid]
        assert tuning[name]["chosen"] == min(tried, key=lambda t: t["val_loss_x"])["hp"]
    for name in ("adamw", "sf_adamw", "psgd_kron"):
        assert [t["hp"]["lr"] for t in tuning[name]["tried"]] == [3e-3, 1e-2]
    top = {(r["optimizer"], r["budget"]): r for r in rows
           if r["N"] == (20 if OPTIMIZERS[r["optimizer"]].core else 10)}
    assert {n for n, _ in top} == set(OPTIMIZERS)
    assert {r["optimizer"] for r in rows if r["N"] == 20} == {n for n, s in OPTIMIZERS.items() if s.core}
    for (name, budget), r in top.items():
        n = r["N"]
        assert r["seeds"] == [1, 2], r
        assert r["val_loss_x"]["std"] > 0 and np.isfinite(r["val_loss_x"]["mean"])
        two = OPTIMIZERS[name].two_pass
        assert r["grad_evals"] == (2 * n if budget == "steps" else n) and r["steps"] == (n // 2 if two and budget == "grads" else n)
        if budget == "grads":
            assert r["hessian_top"] is not None and r["sharpness"] is not None and r["landscape_rise"] is not None
            assert r["gap"] is not None
        assert (r["val_loss_y"] is not None) == (OPTIMIZERS[name].kind in ("msam", "seed_sign", "sf"))
    cell = json.loads(next((out / "cells").glob("final-msam_sf_1p-*steps20.json")).read_text())["cells"]
    last = [c for c in cell if c["N"] == 20 and c["budget"] == "grads"][0]
    assert len(last["hessian_history"]) == last["hessian_iterations"] >= 1
    assert set(last["sam_sharpness"]) == {"0.01", "0.05", "0.1"} and len(last["landscape_1d"]["losses"]) == 5
    for png in ("val_vs_grads.png", "landscape_1d.png", "sharpness_vs_val.png"):
        assert (out / png).stat().st_size > 1000
    assert "| 20 grads |" in (out / "table.md").read_text()
    # a rerun trains nothing: every finished run is read back
    p = _run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)])
    assert "(0 runs trained," in p.stderr, p.stderr[-2000:]


def test_gpt124m_preset_torchrun_tiny(tmp_path):
    data = tmp_path / "tokens.bin"
    rng = np.random.default_rng(0)
    np.tile(rng.integers(0, 500, size=700, dtype=np.uint16), 12).tofile(data)  # repeating: learnable
    out = tmp_path / "g"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
          "--preset", "gpt124m", "--data", str(data), "--tokens", "1280", "--out", str(out),
          "--optimizers", "adamw,msam_sf_1p", "--hessian-iters", "2",
          "--set", "engine.device=cpu", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
          "model.vocab_size=512", "train.global_batch_size=4", "train.micro_batch_size=1", "eval.batches=2"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["budgets"] == [10]  # 1280 tokens / (4 x 32)
    assert "engine.dtype=bf16" in meta["settings"] and "model.n_embd=768" in meta["settings"]
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert {r["optimizer"] for r in rows} == {"adamw", "msam_sf_1p"}
    for r in rows:
        assert r["grad_evals"] == 10 and r["hessian_top"] is not None and np.isfinite(r["val_loss_x"]["mean"])
    first = json.loads(next((out / "cells").glob("final-adamw-*.json")).read_text())
    assert first["train_losses"][-1] < first["train_losses"][0]
