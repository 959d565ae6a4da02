"""An engine built elsewhere, on 2 gloo ranks: ``attach(engine)`` for an optimizer built without
``backend=`` (what HF/Accelerate/Lightning do), the refusal of an unattached one, and
``register()`` (the JSON route of ``deepspeed.initialize``).

Each case trains the tiny model of :mod:`tests.ds_scenarios` and compares the eval-mode weights
with the single-process reference on the same global batches; one step counter per engine step;
the ascent scale is the same on every rank and equals −ρ/||m|| (one_pass) over the gathered
global m. ZeRO-1/2/3 and the BF16_Optimizer.
"""
import pytest

from tests import ds_scenarios as S
from tests.ds_scenarios import shm_op  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_op")]

STEPS = 3
TOL = 1e-5
# name: (stage, sam_mode, dtype); "bf16opt": ZeRO-1 + bf16 with fp32 gradient accumulation (BF16_Optimizer)
ATTACH_CASES = {"attach/zero2/one_pass": (2, "one_pass", "fp32"), "attach/zero3/two_pass": (3, "two_pass", "fp32"),
                "attach/zero1-bf16opt/one_pass": (1, "one_pass", "bf16opt")}
REGISTER_CASES = {"register/zero2/two_pass": (2, "two_pass"), "register/zero3/one_pass": (3, "one_pass")}


def _global_m_norm(opt):
    """||m|| over every rank's partitions of every group (this rank's sum of squares, all-reduced)."""
    import torch
    import torch.distributed as dist
    with opt._driver.param_groups_filled():
        sq = sum(float(opt.optimizer.state[p]["exp_avg"].float().pow(2).sum())
                 for g in opt.param_groups for p in g["params"] if "exp_avg" in opt.optimizer.state[p])
    t = torch.tensor([sq], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.sqrt())


def _record_ascents(opt, mode):
    """two_pass: after each move_to_ascent(), the scale of every group and +ρ/||m|| over the global m
    (step() resets the scale, so it is read here)."""
    seen = []
    if mode != "two_pass":
        return seen
    original = opt.move_to_ascent

    def move_to_ascent():
        original()
        seen.append(([g["ascent_scale"] for g in opt.param_groups], opt.param_groups[0]["rho"] / _global_m_norm(opt)))
    opt.move_to_ascent = move_to_ascent
    return seen


def _measure(rec, name, engine, opt, mode, dtype="fp32", ascents=()):
    if ascents:
        rec(name, ascents=list(ascents))
    rho = opt.param_groups[0]["rho"]
    scales = [g["ascent_scale"] for g in opt.param_groups]
    sign = -1.0 if mode == "one_pass" else 1.0
    rec(name, k=[g["k"] for g in opt.param_groups], scales=scales,
        expected_scale=sign * rho / _global_m_norm(opt) if mode == "one_pass" else None)
    engine.optimizer.eval()  # on the ZeRO wrapper, as Accelerate calls it
    control = S.reference_run(STEPS, mode, dtype="bf16" if dtype == "bf16opt" else "fp32")
    rec(name, vs_reference=S.max_diff(opt.eval_state_dict(), control),
        module_is_rounded_x=S.rounded_equal(engine), kind=opt.kind)


def _ranks(rank, world, rec):
    import deepspeed

    from sharded_msam_sf import AdamWMSAMScheduleFree
    from sharded_msam_sf.config import ConfigError
    from sharded_msam_sf.deepspeed import attach, register, unregister
    from sharded_msam_sf.deepspeed.ds_config import client_config

    def attached(name, stage, mode, dtype):
        cfg = S.ds_config(stage, "bf16", mode, bf16_optimizer=True) if dtype == "bf16opt" else S.ds_config(stage, "fp32", mode)
        engine, _ = S.make_engine_elsewhere(cfg)
        try:
            opt = attach(engine)
            rec(name, idempotent=attach(engine) is opt and attach(engine.optimizer) is opt)
            engine.optimizer.train()
            ascents = _record_ascents(opt, mode)
            S.ds_train(engine, opt, STEPS, mode)
            _measure(rec, name, engine, opt, mode, dtype, ascents)
        finally:
            engine.destroy()

    def unattached(name):
        engine, ours = S.make_engine_elsewhere(S.ds_config(2, "fp32", "one_pass"))
        try:
            ours.train()
            x, y = S.batch(0)
            engine.backward(S.loss_fn(engine(x[:4]), y[:4]))
            try:
                engine.step()
                rec(name, raised=None)
            except RuntimeError as e:
                rec(name, raised=str(e))
        finally:
            engine.destroy()

    def registered(name, stage, mode):
        register()
        register()  # idempotent
        try:
            model = S.make_model()
            cfg = S.ds_config(stage, "fp32", mode)
            cfg["zero_allow_untested_optimizer"] = False  # register() sets it for ours
            engine, zero, _, _ = deepspeed.initialize(model=model, model_parameters=S.param_groups(model, 0.02),
                                                      config=cfg)
        finally:
            unregister()
        try:
            opt = engine.optimizer._msam_facade
            rec(name, is_facade=type(opt).__name__, same_zero=zero is engine.optimizer)
            zero.train()
            ascents = _record_ascents(opt, mode)
            S.ds_train(engine, opt, STEPS, mode)
            _measure(rec, name, engine, opt, mode, "fp32", ascents)
        finally:
            engine.destroy()

    def register_refusals(name):
        register()
        try:
            cfg = S.ds_config(2, "fp32", "one_pass")
            cfg["optimizer"]["params"]["lrr"] = 0.1
            try:
                deepspeed.initialize(model=S.make_model(), config=cfg)
                rec(name, bad_key=None)
            except ConfigError as e:
                rec(name, bad_key=str(e))
            cfg = S.ds_config(2, "fp32", "two_pass", gas=2)
            try:
                deepspeed.initialize(model=S.make_model(), config=cfg)
                rec(name, two_pass_gas=None)
            except ConfigError as e:
                rec(name, two_pass_gas=str(e))
        finally:
            unregister()
        try:
            deepspeed.initialize(model=S.make_model(), config=S.ds_config(2, "fp32", "one_pass"))
            rec(name, unregistered=None)
        except AssertionError as e:
            rec(name, unregistered=str(e))

    def attach_refusals(name):
        cfg = S.ds_config(2, "fp32", "one_pass")
        model = S.make_model()
        opt = AdamWMSAMScheduleFree(S.param_groups(model), lr=0.02, rho=0.05)
        opt.train()
        x, y = S.batch(0)
        S.loss_fn(model(x), y).backward()
        opt.step()  # a step outside any engine: its state is for the full params
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=client_config(cfg))
        try:
            attach(engine)
            rec(name, after_local_step=None)
        except RuntimeError as e:
            rec(name, after_local_step=str(e))
        finally:
            engine.destroy()

    def stage0(name):
        """fp16/bf16 without ZeRO: DeepSpeed's FP16 wrappers step the optimizer inside deepspeed.initialize."""
        from sharded_msam_sf.deepspeed import initialize
        S.allow_cpu_fp16()
        for dtype in ("fp16", "bf16"):
            cfg = S.ds_config(0, dtype, "one_pass")
            model = S.make_model()
            try:
                initialize(model=model, model_parameters=S.param_groups(model), config=cfg)
                rec(name, **{f"{dtype}/initialize": None})
            except (ConfigError, NotImplementedError) as e:
                rec(name, **{f"{dtype}/initialize": f"{type(e).__name__}: {e}"})
            model = S.make_model()
            opt = AdamWMSAMScheduleFree(S.param_groups(model), lr=0.02, rho=0.05)
            try:
                deepspeed.initialize(model=model, optimizer=opt, config=client_config(cfg))
                rec(name, **{f"{dtype}/plain": None})
            except NotImplementedError as e:
                rec(name, **{f"{dtype}/plain": f"{type(e).__name__}: {e}"})

    rec.case("attach/refusals", lambda: attach_refusals("attach/refusals"))
    rec.case("stage0", lambda: stage0("stage0"))
    for name, (stage, mode, dtype) in ATTACH_CASES.items():
        rec.case(name, lambda: attached(name, stage, mode, dtype))
    rec.case("unattached", lambda: unattached("unattached"))
    for name, (stage, mode) in REGISTER_CASES.items():
        rec.case(name, lambda: registered(name, stage, mode))
    rec.case("register/refusals", lambda: register_refusals("register/refusals"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return S.run_cases(_ranks, tmp_path_factory.mktemp("ds_attach"))


@pytest.mark.parametrize("case", list(ATTACH_CASES) + list(REGISTER_CASES))
def test_trajectory_equals_reference(results, case):
    tol = S.CONTROL_TOL if "bf16" in case else TOL  # bf16: a control under the same precision policy
    for v in S.case_values(results, case):
        assert v["vs_reference"] <= tol, v
        assert v["module_is_rounded_x"] == 0.0, v  # engine.module computes with x (rounded to its dtype)


def test_bf16_optimizer_is_attached(results):
    for v in S.case_values(results, "attach/zero1-bf16opt/one_pass"):
        assert v["kind"] == "bf16", v


@pytest.mark.parametrize("case", list(ATTACH_CASES) + list(REGISTER_CASES))
def test_one_step_counter_per_engine_step(results, case):
    for v in S.case_values(results, case):
        assert v["k"] == [STEPS] * len(v["k"]), v


@pytest.mark.parametrize("case", list(ATTACH_CASES) + list(REGISTER_CASES))
def test_ascent_scale_same_on_every_rank_and_global(results, case):
    values = S.case_values(results, case)
    scales = [v["scales"] for v in values]
    assert all(s == scales[0] for s in scales), scales
    assert len(set(scales[0])) == 1, scales  # one ||m|| for every group, not one per group
    if values[0]["expected_scale"] is not None:  # one_pass: the scale of the current ascent, from the m it holds
        assert scales[0][0] == pytest.approx(values[0]["expected_scale"], rel=1e-5)
    else:  # two_pass: each step's ascent, read after move_to_ascent()
        ascents = [v["ascents"] for v in values]
        assert len(ascents[0]) == STEPS and all(a == ascents[0] for a in ascents), ascents
        for group_scales, expected in ascents[0]:
            assert len(set(group_scales)) == 1 and group_scales[0] == pytest.approx(expected, rel=1e-5), ascents[0]


def test_attach_is_idempotent(results):
    for v in S.case_values(results, "attach/zero2/one_pass"):
        assert v["idempotent"]


def test_register_attaches_the_engine_it_builds(results):
    for v in S.case_values(results, "register/zero3/one_pass"):
        assert v["is_facade"] == "DeepSpeedMSAMOptimizer" and v["same_zero"]


def test_unattached_step_raises_naming_attach(results):
    for v in S.case_values(results, "unattached"):
        assert v["raised"] is not None and "attach(engine)" in v["raised"] and "register()" in v["raised"], v


def test_register_refusals(results):
    for v in S.case_values(results, "register/refusals"):
        assert v["bad_key"] is not None and "optimizer.params.lrr" in v["bad_key"], v
        assert v["two_pass_gas"] is not None and "gradient_accumulation_steps" in v["two_pass_gas"], v
        assert v["unregistered"] is not None and "not a supported DeepSpeed Optimizer" in v["unregistered"], v


def test_attach_refusals(results):
    for v in S.case_values(results, "attach/refusals"):
        # attach's own refusal, or (with late binding) the optimizer's: its state was made for other tensors
        assert v["after_local_step"] is not None and ("already stepped outside the engine" in v["after_local_step"] or
                                                      "after the optimizer state was created" in v["after_local_step"]), v


def test_stage0_fp16_and_bf16_are_refused_naming_the_stage(results):
    """Not the misleading 'step() was called in eval mode' of the FP16 wrapper's state-init step."""
    for v in S.case_values(results, "stage0"):
        assert v["fp16/initialize"].startswith("ConfigError: zero_optimization.stage: 0 with fp16 enabled"), v
        for key in ("bf16/initialize", "fp16/plain", "bf16/plain"):
            assert v[key] is not None and v[key].startswith("NotImplementedError:"), v
            assert "FP16_UnfusedOptimizer" in v[key] and "set zero_optimization.stage to 1, 2 or 3" in v[key], v
