"""DeepSpeed features with AdamWMSAMScheduleFree on 2 gloo ranks: fp16 overflow skips, gradient
accumulation, clipping, checkpoint resume, and the config errors of initialize()."""
import json

import pytest

from tests.ds_scenarios import shm_op  # noqa: F401
from tests.harness import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_op")]

STEPS = 4
TOL = 1e-5


def _snapshot(S, engine, opt):
    import copy
    with opt._driver.param_groups_filled():
        state = {k: v.clone() for p in opt.optimizer.state for k, v in opt.optimizer.state[p].items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return S.master_weights(engine), S.module_weights(engine), state, copy.deepcopy(groups)


def _same(a, b):
    import torch
    return all(torch.equal(a[k], b[k]) for k in a)


def _features_ranks(rank, world, out_path):
    import torch
    from tests import ds_scenarios as S
    results = {}

    # --- fp16 dynamic loss scaling: an overflow skips the step, state and ascent stay consistent
    for stage, mode in ((2, "one_pass"), (3, "one_pass"), (2, "two_pass")):
        engine, opt = S.make_engine(S.ds_config(stage, "fp16", mode))
        opt.train()
        S.ds_train(engine, opt, 1, mode)
        before = _snapshot(S, engine, opt)
        scale = opt.zero_optimizer.loss_scale
        applied = S.ds_train(engine, opt, 2, mode, start=1, inf_at=(1,))
        after = _snapshot(S, engine, opt)
        assert applied == [False], applied
        assert opt.zero_optimizer.loss_scale < scale, "the loss scale drops on overflow"
        assert _same(before[0], after[0]) and _same(before[1], after[1]), "weights changed by a skipped step"
        assert _same(before[2], after[2]), "optimizer state changed by a skipped step"
        keep = ("k", "weight_sum", "lr_max", "ascent_scale", "at_ascent", "train_mode")
        assert [{k: g[k] for k in keep} for g in before[3]] == [{k: g[k] for k in keep} for g in after[3]]
        assert S.rounded_equal(engine) == 0.0, "fp16 weights are not the rounded masters after a skip"
        applied = S.ds_train(engine, opt, STEPS, mode, start=2)
        assert all(applied)
        assert [g["k"] for g in opt.param_groups] == [STEPS - 1] * 2
        opt.eval()
        ref = S.reference_run(STEPS, mode, skip_steps=(1,))
        results[f"zero{stage}/fp16/{mode}/overflow_at_1"] = S.max_diff(opt.eval_state_dict(), ref)
        engine.destroy()

    # --- gradient accumulation: the ascent moves only at the boundary; equals the global batch
    for stage in (2, 3):
        engine, opt = S.make_engine(S.ds_config(stage, "fp32", "one_pass", gas=2))
        opt.train()
        S.ds_train(engine, opt, STEPS, "one_pass", gas=2)
        assert [g["k"] for g in opt.param_groups] == [STEPS] * 2
        opt.eval()
        results[f"zero{stage}/fp32/one_pass/gas2"] = S.max_diff(opt.eval_state_dict(), S.reference_run(STEPS, "one_pass"))
        engine.destroy()

    # --- gradient clipping (DeepSpeed clips before the client step; two_pass: both gradients)
    for stage, mode in ((1, "one_pass"), (3, "two_pass")):
        engine, opt = S.make_engine(S.ds_config(stage, "fp32", mode, clip=0.05))
        opt.train()
        S.ds_train(engine, opt, STEPS, mode)
        assert engine.get_global_grad_norm() > 0.05, "clipping is not active in this test"
        opt.eval()
        ref = S.reference_run(STEPS, mode, clip=0.05)
        unclipped = S.reference_run(STEPS, mode)
        sd = opt.eval_state_dict()
        results[f"zero{stage}/fp32/{mode}/clip0.05"] = S.max_diff(sd, ref)
        assert S.max_diff(sd, unclipped) > 1e-4, "clipping made no difference"
        engine.destroy()

    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    for name, d in results.items():
        tol = 5e-3 if "fp16" in name else TOL
        assert d <= tol, (name, d)


def test_fp16_overflow_gradient_accumulation_and_clipping(tmp_path):
    out = tmp_path / "features.json"
    run_ranks(_features_ranks, 2, str(out), timeout=400)
    print(json.loads(out.read_text()))


def _checkpoint_ranks(rank, world, ckpt_dir, out_path):
    from tests import ds_scenarios as S
    results = {}
    cases = [("zero2/fp32/one_pass", dict(stage=2, dtype="fp32", sam_mode="one_pass")),
             ("zero3/fp32/two_pass", dict(stage=3, dtype="fp32", sam_mode="two_pass")),
             ("zero1/bf16(BF16_Optimizer)/one_pass", dict(stage=1, dtype="bf16", sam_mode="one_pass", bf16_optimizer=True))]
    for name, kw in cases:
        mode = kw["sam_mode"]
        tag = name.replace("/", "_").replace("(", "_").replace(")", "")
        engine, opt = S.make_engine(S.ds_config(**kw))
        opt.train()
        S.ds_train(engine, opt, 2, mode)
        engine.save_checkpoint(ckpt_dir, tag=tag)
        S.ds_train(engine, opt, STEPS, mode, start=2)
        opt.eval()
        uninterrupted, module_a = opt.eval_state_dict(), S.module_weights(engine)
        engine.destroy()

        engine, opt = S.make_engine(S.ds_config(**kw), seed=123)  # other initial weights: all must come from the file
        opt.train()
        path, _ = engine.load_checkpoint(ckpt_dir, tag=tag)
        assert path is not None
        assert [g["k"] for g in opt.param_groups] == [2, 2] and opt.train_mode
        S.ds_train(engine, opt, STEPS, mode, start=2)
        opt.eval()
        resumed, module_b = opt.eval_state_dict(), S.module_weights(engine)
        results[name] = {"masters": S.max_diff(uninterrupted, resumed), "module": S.max_diff(module_a, module_b)}
        # the exported x weights load into a plain fp32 model that computes like engine.module in eval mode
        import torch
        x, _ = S.batch(99)
        dtype = next(engine.module.parameters()).dtype
        with torch.no_grad():
            out_engine = engine(x[:4].to(dtype)).float()
        plain = S.make_model(7)
        plain.load_state_dict(resumed)
        with torch.no_grad():
            out_plain = plain(x[:4])
        results[name]["export_forward_vs_engine"] = float((out_plain - out_engine).abs().max())
        engine.destroy()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    for name, r in results.items():
        assert r["masters"] == 0.0 and r["module"] == 0.0, (name, r)
        assert r["export_forward_vs_engine"] <= (3e-2 if "bf16" in name else 1e-6), (name, r)


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    out = tmp_path / "ckpt.json"
    run_ranks(_checkpoint_ranks, 2, str(tmp_path / "ckpt"), str(out), timeout=400)
    print(json.loads(out.read_text()))
