"""DeepSpeed features with AdamWMSAMScheduleFree on 2 gloo ranks: fp16 overflow skips, gradient
accumulation, clipping, checkpoint resume.

Each scenario starts its 2 ranks once (a module fixture) and records every case's measurements;
each test function asserts one behaviour of one case on every rank.
"""
import pytest

from tests import ds_scenarios as S
from tests.ds_scenarios import shm_op  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_op")]

STEPS = 4
TOL = 1e-5

# ---------------------------------------------------------------------- fp16 overflow, accumulation, clipping
# (stage, sam_mode, the pass that overflows at step 1): two_pass "first" is the ascent pass
# (skip_step(ascent=True), the step after it is skipped), "second" the step's own gradient
# (the "offload" case: ZeRO-Offload keeps the masters' .grad buffers across steps, a skip must too)
FP16_CASES = {f"zero{st}/fp16/{mode}{'/offload' if off else ''}/overflow_in_{which}_pass": (st, mode, which, off)
              for st, mode, which, off in ((2, "one_pass", "first", False), (3, "one_pass", "first", False),
                                           (2, "two_pass", "first", False), (3, "two_pass", "second", False),
                                           (3, "two_pass", "first", True))}
GAS_CASES = {f"zero{st}/fp32/one_pass/gas2": st for st in (2, 3)}
# (stage, plant NaN in the masters' padding before attach()): ZeRO-3 allocates its partitions with
# torch.empty (the tiny model's 3-element bias leaves 1 padding element on rank 1); ZeRO-2's flat
# groups are padded with zeros by DeepSpeed itself
PADDING_CASES = {"zero3/fp32/one_pass/nan_in_padding": (3, True), "zero2/fp32/one_pass/padding": (2, False)}
CLIP_CASES = {"zero1/fp32/one_pass/clip0.05": (1, "one_pass"), "zero3/fp32/two_pass/clip0.05": (3, "two_pass")}


def _snapshot(engine, opt):
    import copy
    with opt._driver.param_groups_filled():
        state = {f"{i}/{k}": opt.optimizer.state[p][k].clone() for g in opt.param_groups
                 for i, p in enumerate(g["params"]) for k in sorted(opt.optimizer.state[p])}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return S.master_weights(engine), S.module_weights(engine), state, copy.deepcopy(groups)


def _same(a, b):
    """Bit-for-bit the same values (the ZeRO-3 partitions' alignment padding included: the driver
    zeros it when binding, see test_zero3_padding_is_zero_and_stays_zero)."""
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _padding_values(engine, opt):
    """The values in the padding of the fp32 masters and of each optimizer state made from them:
    ZeRO-3 by :func:`~sharded_msam_sf.deepspeed.driver.zero3_padding`, ZeRO-1/2 the last
    ``groups_padding[i]`` elements of the last rank's flat partition."""
    import torch
    from sharded_msam_sf.deepspeed.driver import zero3_padding
    zero = engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        ranges = zero3_padding(zero)
    else:
        ranges = [(flat, flat.numel() - pad, flat.numel())
                  for flat, pad in zip(zero.single_partition_of_fp32_groups, zero.groups_padding) if pad]
    out = {"master": [], "z": [], "exp_avg_sq": [], "exp_avg": []}
    for flat, start, end in ranges:
        out["master"] += flat.detach()[start:end].tolist()
        for key, value in opt.optimizer.state.get(flat, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == flat.shape:
                out[key] += value[start:end].tolist()
    return out


def _features_ranks(rank, world, rec):
    import warnings

    def fp16(name, stage, mode, which, offload):
        cfg = S.ds_config(stage, "fp16", mode)
        if offload:
            cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        engine, opt = S.make_engine(cfg)
        try:
            opt.train()
            S.ds_train(engine, opt, 1, mode)
            before = _snapshot(engine, opt)
            scale = opt.zero_optimizer.loss_scale
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                applied = S.ds_train(engine, opt, 2, mode, start=1, inf_at=(1,), inf_pass=which)
            after = _snapshot(engine, opt)
            keep = ("k", "weight_sum", "lr_max", "ascent_scale", "at_ascent", "train_mode")
            z_v = [k for k in before[2] if not k.endswith("exp_avg")]
            m = [k for k in before[2] if k.endswith("exp_avg")]
            rec(name, applied_at_overflow=applied, scale=[scale, opt.zero_optimizer.loss_scale],
                skip_warned=any("skipped" in str(w.message) for w in caught),
                masters_unchanged=_same(before[0], after[0]), module_unchanged=_same(before[1], after[1]),
                masters_change=S.max_diff(before[0], after[0]),
                z_v_unchanged=_same({k: before[2][k] for k in z_v}, {k: after[2][k] for k in z_v}),
                m_unchanged=_same({k: before[2][k] for k in m}, {k: after[2][k] for k in m}),
                groups_unchanged=[{k: g[k] for k in keep} for g in before[3]] == [{k: g[k] for k in keep} for g in after[3]],
                rounding_after_skip=S.rounded_equal(engine))
            applied = S.ds_train(engine, opt, STEPS, mode, start=2)
            rec(name, applied_after=applied, k=[g["k"] for g in opt.param_groups], skipped=opt.skipped_steps,
                engine_skipped=engine.skipped_steps)
            opt.eval()
            x = opt.eval_state_dict()
            s0, s1 = scale, opt.zero_optimizer.loss_scale
            control = S.reference_run(STEPS, mode, nan_at={1: which}, dtype="fp16", loss_scales={0: s0, 2: s1, 3: s1})
            rec(name, vs_control=S.max_diff(x, control),
                vs_fp32_control=S.max_diff(x, S.reference_run(STEPS, mode, nan_at={1: which})))
        finally:
            engine.destroy()

    def gas(name, stage):
        engine, opt = S.make_engine(S.ds_config(stage, "fp32", "one_pass", gas=2))
        try:
            opt.train()
            S.ds_train(engine, opt, STEPS, "one_pass", gas=2)
            rec(name, k=[g["k"] for g in opt.param_groups])
            opt.eval()
            rec(name, diff=S.max_diff(opt.eval_state_dict(), S.reference_run(STEPS, "one_pass")))
            try:
                opt.move_to_ascent()
                rec(name, eval_mode_ascent_error=None)
            except RuntimeError as e:
                rec(name, eval_mode_ascent_error=str(e))
        finally:
            engine.destroy()

    def clip(name, stage, mode):
        engine, opt = S.make_engine(S.ds_config(stage, "fp32", mode, clip=0.05))
        try:
            opt.train()
            S.ds_train(engine, opt, STEPS, mode)
            rec(name, grad_norm=float(engine.get_global_grad_norm()))
            opt.eval()
            sd = opt.eval_state_dict()
            rec(name, diff=S.max_diff(sd, S.reference_run(STEPS, mode, clip=0.05)),
                vs_unclipped=S.max_diff(sd, S.reference_run(STEPS, mode)))
        finally:
            engine.destroy()

    def padding(name, stage, plant):
        """Built elsewhere and attached, NaN planted in the masters' padding before attach()."""
        from sharded_msam_sf.deepspeed.driver import zero3_padding
        from sharded_msam_sf.deepspeed import attach
        cfg = S.ds_config(stage, "fp32", "one_pass")
        engine, _ = S.make_engine_elsewhere(cfg)
        try:
            planted = 0
            if plant:
                for flat, start, end in zero3_padding(engine.optimizer):
                    flat.data[start:end] = float("nan")
                    planted += end - start
            opt = attach(engine)
            rec(name, planted=planted, at_bind=_padding_values(engine, opt)["master"])
            opt.train()
            S.ds_train(engine, opt, STEPS, "one_pass")
            rec(name, after_steps=_padding_values(engine, opt))
            opt.eval()
            x = opt.eval_state_dict()
        finally:
            engine.destroy()
        engine, opt = S.make_engine(cfg)  # the same run, nothing planted
        try:
            opt.train()
            S.ds_train(engine, opt, STEPS, "one_pass")
            opt.eval()
            rec(name, vs_unplanted=S.max_diff(x, opt.eval_state_dict()),
                vs_reference=S.max_diff(x, S.reference_run(STEPS, "one_pass")))
        finally:
            engine.destroy()

    for name, args in PADDING_CASES.items():
        rec.case(name, lambda: padding(name, *args))
    for name, args in FP16_CASES.items():
        rec.case(name, lambda: fp16(name, *args))
    for name, stage in GAS_CASES.items():
        rec.case(name, lambda: gas(name, stage))
    for name, args in CLIP_CASES.items():
        rec.case(name, lambda: clip(name, *args))


@pytest.fixture(scope="module")
def feature_runs(tmp_path_factory):
    return S.run_cases(_features_ranks, tmp_path_factory.mktemp("ds_features"))


@pytest.mark.parametrize("case", list(PADDING_CASES))
def test_partition_padding_is_zero_and_stays_zero(feature_runs, case):
    """The masters' alignment padding is zero after attach() (NaN planted there under ZeRO-3), and
    z, v, m and the masters hold zeros there after the steps."""
    values = S.case_values(feature_runs, case)
    if PADDING_CASES[case][0] == 3:
        assert sum(v["planted"] for v in values) > 0, "no rank has ZeRO-3 padding: the test checks nothing"
    for r, v in enumerate(values):
        assert all(t == 0.0 for t in v["at_bind"]), f"rank {r}: master padding after attach(): {v['at_bind']}"
        for key, got in v["after_steps"].items():
            assert all(t == 0.0 for t in got), f"rank {r}: {key} padding after {STEPS} steps: {got}"
        assert len(v["after_steps"]["z"]) == len(v["at_bind"]), f"rank {r}: no optimizer state on the padding"


@pytest.mark.parametrize("case", list(PADDING_CASES))
def test_partition_padding_does_not_change_the_trajectory(feature_runs, case):
    for r, v in enumerate(S.case_values(feature_runs, case)):
        assert v["vs_unplanted"] == 0.0, f"rank {r}: differs from the run without NaN by {v['vs_unplanted']}"
        assert v["vs_reference"] <= TOL, f"rank {r}: {v['vs_reference']} from the single-process optimizer"


@pytest.mark.parametrize("case", list(FP16_CASES))
def test_fp16_overflow_skips_the_step_and_drops_the_scale(feature_runs, case):
    for r, v in enumerate(S.case_values(feature_runs, case)):
        assert v["applied_at_overflow"] == [False], f"rank {r}: was_step_applied() {v['applied_at_overflow']}"
        assert v["scale"][1] < v["scale"][0], f"rank {r}: loss scale {v['scale'][0]} -> {v['scale'][1]}"
        assert v["skipped"] == 1 and v["engine_skipped"] == 1, f"rank {r}: skipped {v['skipped']}, engine {v['engine_skipped']}"
        assert v["skip_warned"], f"rank {r}: the skip was not reported by a RuntimeWarning"


@pytest.mark.parametrize("case", list(FP16_CASES))
def test_fp16_overflow_leaves_weights_unchanged(feature_runs, case):
    second = FP16_CASES[case][2] == "second"
    for r, v in enumerate(S.case_values(feature_runs, case)):
        if second:  # the clean ascent pass moved to y + s·m and back: y up to the rounding of ±s·m
            assert v["masters_change"] <= 1e-7, f"rank {r}: the fp32 masters moved by {v['masters_change']}"
        else:
            assert v["masters_unchanged"], f"rank {r}: the fp32 masters changed in a skipped step"
            assert v["module_unchanged"], f"rank {r}: engine.module's weights changed in a skipped step"
        assert v["rounding_after_skip"] == 0.0, f"rank {r}: fp16 weights are not the rounded masters after a skip"


@pytest.mark.parametrize("case", list(FP16_CASES))
def test_fp16_overflow_leaves_optimizer_state_unchanged(feature_runs, case):
    """z, v and the counters stay; m too, except that a clean two_pass ascent pass has folded its
    gradient into m before the step's own gradient overflowed (as on one process)."""
    second = FP16_CASES[case][2] == "second"
    for r, v in enumerate(S.case_values(feature_runs, case)):
        assert v["z_v_unchanged"], f"rank {r}: z or v changed in a skipped step"
        assert v["m_unchanged"] != second, f"rank {r}: m {'un' if second else ''}changed"
        assert v["groups_unchanged"], f"rank {r}: the counters or the ascent changed in a skipped step"


@pytest.mark.parametrize("case", list(FP16_CASES))
def test_fp16_training_resumes_after_the_skip(feature_runs, case):
    for r, v in enumerate(S.case_values(feature_runs, case)):
        assert all(v["applied_after"]), f"rank {r}: was_step_applied() {v['applied_after']} after the overflow"
        assert v["k"] == [STEPS - 1] * 2, f"rank {r}: step counters {v['k']}"


@pytest.mark.parametrize("case", list(FP16_CASES))
def test_fp16_matches_the_same_precision_control(feature_runs, case):
    """The control: fp16 forward/backward on the rounded masters with DeepSpeed's loss scales, NaN
    gradients in the pass that overflowed (ds_scenarios.reference_run(dtype="fp16")); measured: 0
    or 2.3e-10, against 1.2e-4 from an fp32 control."""
    for r, v in enumerate(S.case_values(feature_runs, case)):
        assert v["vs_control"] <= S.CONTROL_TOL, \
            f"rank {r}: differs from the fp16-policy control by {v['vs_control']} (fp32 control: {v['vs_fp32_control']})"


@pytest.mark.parametrize("case", list(GAS_CASES))
def test_gradient_accumulation_equals_the_global_batch(feature_runs, case):
    for r, v in enumerate(S.case_values(feature_runs, case)):
        assert v["k"] == [STEPS] * 2, f"rank {r}: step counters {v['k']}: the ascent moves only at the boundary"
        assert v["diff"] <= TOL, f"rank {r}: {v['diff']} from the single-process optimizer on the whole batch"


@pytest.mark.parametrize("case", list(GAS_CASES))
def test_facade_move_to_ascent_in_eval_mode_raises(feature_runs, case):
    """The facade's move_to_ascent() (which runs through the ZeRO step) gives the optimizer's own
    eval-mode error (AdamWMSAMScheduleFree.require_train)."""
    for r, v in enumerate(S.case_values(feature_runs, case)):
        assert (v["eval_mode_ascent_error"] or "").startswith("move_to_ascent() was called in eval mode: call "
                                                             "optimizer.train()"), f"rank {r}: {v['eval_mode_ascent_error']}"


@pytest.mark.parametrize("case", list(CLIP_CASES))
def test_clipping_matches_a_clipped_single_process_run(feature_runs, case):
    """DeepSpeed clips before the client step (two_pass: both gradients)."""
    for r, v in enumerate(S.case_values(feature_runs, case)):
        assert v["grad_norm"] > 0.05, f"rank {r}: clipping is not active in this test (norm {v['grad_norm']})"
        assert v["vs_unclipped"] > 1e-4, f"rank {r}: clipping made no difference"
        assert v["diff"] <= TOL, f"rank {r}: {v['diff']} from the clipped single-process optimizer"


# ---------------------------------------------------------------------- checkpoints
CKPT_CASES = {"zero2/fp32/one_pass": dict(stage=2, dtype="fp32", sam_mode="one_pass"),
              "zero3/fp32/two_pass": dict(stage=3, dtype="fp32", sam_mode="two_pass"),
              "zero1/bf16(BF16_Optimizer)/one_pass": dict(stage=1, dtype="bf16", sam_mode="one_pass",
                                                          bf16_optimizer=True)}


def _checkpoint_ranks(rank, world, rec, ckpt_dir):
    import torch

    def run(name, kw):
        mode = kw["sam_mode"]
        tag = name.replace("/", "_").replace("(", "_").replace(")", "")
        engine, opt = S.make_engine(S.ds_config(**kw))
        try:
            opt.train()
            S.ds_train(engine, opt, 2, mode)
            engine.save_checkpoint(ckpt_dir, tag=tag)
            S.ds_train(engine, opt, STEPS, mode, start=2)
            opt.eval()
            uninterrupted, module_a = opt.eval_state_dict(), S.module_weights(engine)
        finally:
            engine.destroy()

        engine, opt = S.make_engine(S.ds_config(**kw), seed=123)  # other initial weights: all must come from the file
        try:
            opt.train()
            path, _ = engine.load_checkpoint(ckpt_dir, tag=tag)
            rec(name, loaded=path is not None, k_loaded=[g["k"] for g in opt.param_groups], train_mode=opt.train_mode)
            S.ds_train(engine, opt, STEPS, mode, start=2)
            opt.eval()
            resumed, module_b = opt.eval_state_dict(), S.module_weights(engine)
            rec(name, masters=S.max_diff(uninterrupted, resumed), module=S.max_diff(module_a, module_b))
            # the exported x weights load into a plain fp32 model; rounded to the engine's dtype they
            # are its weights, so that model computes like engine.module in eval mode
            x, _ = S.batch(99)
            dtype = next(engine.module.parameters()).dtype
            with torch.no_grad():
                out_engine = engine(x[:4].to(dtype)).float()
            plain = S.make_model(7).to(dtype)
            plain.load_state_dict({k: v.to(dtype) for k, v in resumed.items()})
            with torch.no_grad():
                out_plain = plain(x[:4].to(dtype)).float()
            rec(name, export_forward_vs_engine=float((out_plain - out_engine).abs().max()))
        finally:
            engine.destroy()

    for name, kw in CKPT_CASES.items():
        rec.case(name, lambda: run(name, kw))


@pytest.fixture(scope="module")
def checkpoint_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_ckpt")
    return S.run_cases(_checkpoint_ranks, root / "results", str(root / "ckpt"))


@pytest.mark.parametrize("case", list(CKPT_CASES))
def test_checkpoint_load_restores_counters_and_mode(checkpoint_runs, case):
    for r, v in enumerate(S.case_values(checkpoint_runs, case)):
        assert v["loaded"], f"rank {r}: engine.load_checkpoint found nothing"
        assert v["k_loaded"] == [2, 2] and v["train_mode"], f"rank {r}: k {v['k_loaded']}, train {v['train_mode']}"


@pytest.mark.parametrize("case", list(CKPT_CASES))
def test_checkpoint_resume_equals_uninterrupted_run(checkpoint_runs, case):
    for r, v in enumerate(S.case_values(checkpoint_runs, case)):
        assert v["masters"] == 0.0, f"rank {r}: resumed masters differ by {v['masters']}"
        assert v["module"] == 0.0, f"rank {r}: resumed engine.module differs by {v['module']}"


@pytest.mark.parametrize("case", list(CKPT_CASES))
def test_exported_weights_compute_like_the_engine(checkpoint_runs, case):
    for r, v in enumerate(S.case_values(checkpoint_runs, case)):
        assert v["export_forward_vs_engine"] <= 1e-6, f"rank {r}: {v['export_forward_vs_engine']}"
