"""Accelerate with DeepSpeed and no Trainer, on 2 gloo ranks: ``Accelerator(deepspeed_plugin=
DeepSpeedPlugin(hf_ds_config=...))``, ``prepare`` with the model first or the optimizer first, our
optimizer by class (``attach(model)`` after ``prepare``, or ``register()`` before it) and by JSON
(``register()``, ``DummyOptim``). ``train()``/``eval()`` on Accelerate's wrapper reach the engine's
weights; the x equals the single-process reference on the same global batches; one step counter per
engine step. (On these ranks the process group exists before the Accelerator: Accelerate then runs
DeepSpeed on it; see docs/integrations.md.)"""
import pytest

pytest.importorskip("accelerate")

from tests import ds_scenarios as S  # noqa: E402
from tests.ds_scenarios import shm_op  # noqa: E402,F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_op")]

STEPS = 3
TOL = 1e-5
# name: (stage, sam_mode, route, order); class-attach: attach(model) after prepare, without register()
CASES = {"class-attach/zero2/one_pass/model_first": (2, "one_pass", "class-attach", "model_first"),
         "class-register/zero3/two_pass/optimizer_first": (3, "two_pass", "class-register", "optimizer_first"),
         "json/zero2/two_pass/optimizer_first": (2, "two_pass", "json", "optimizer_first"),
         "json/zero3/one_pass/model_first": (3, "one_pass", "json", "model_first"),
         # DeepSpeed's gradient_clipping at every step: two_pass folds g0 unclipped (ALGORITHM.md)
         "class-register/zero2/two_pass/model_first/clip0.05": (2, "two_pass", "class-register", "model_first", 0.05)}


def _train(acc, model, opt, mode, rank, world):
    """Accelerate's loop on this rank's share of each global batch. two_pass: Accelerate's backward also
    runs engine.step(), so the first pass is the engine's own backward, and the second pass's step
    removes the ascent before the update (no move_from_ascent())."""
    from sharded_msam_sf.deepspeed import facade_of
    per = S.GLOBAL_BATCH // world
    for k in range(STEPS):
        x, y = S.batch(k)
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        if mode == "two_pass":
            model.backward(S.loss_fn(model(xs), ys))
            facade_of(opt).move_to_ascent()
            acc.backward(S.loss_fn(model(xs), ys))
        else:
            acc.backward(S.loss_fn(model(xs), ys))
        opt.step()
        opt.zero_grad()


def _ranks(rank, world, rec):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin, DummyOptim

    from sharded_msam_sf import AdamWMSAMScheduleFree
    from sharded_msam_sf.deepspeed import attach, facade_of, register, unregister

    def case(name, stage, mode, route, order, clip=0.0):
        AcceleratorState._reset_state(reset_partial_state=True)
        cfg = S.ds_config(stage, "fp32", mode, clip=clip)
        model = S.make_model()
        if route == "json":
            opt = DummyOptim(S.param_groups(model))
        else:
            p = cfg.pop("optimizer")["params"]
            cfg["zero_allow_untested_optimizer"] = True
            opt = AdamWMSAMScheduleFree(S.param_groups(model, p["lr"]), lr=p["lr"], rho=p["rho"], sam_mode=mode,
                                        betas=tuple(p["betas"]), weight_decay=p["weight_decay"],
                                        warmup_steps=p["warmup_steps"])
        acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))
        if route != "class-attach":
            register()
        try:
            if order == "model_first":
                model, opt = acc.prepare(model, opt)
            else:
                opt, model = acc.prepare(opt, model)
        finally:
            unregister()
        try:
            if route == "class-attach":
                attach(model)
            facade = facade_of(opt)
            rec(name, distributed=str(acc.distributed_type), engine=type(model).__name__,
                facade=type(facade).__name__)
            opt.train()  # Accelerate's wrapper -> the ZeRO wrapper -> the engine's weights
            _train(acc, model, opt, mode, rank, world)
            opt.eval()
            rec(name, eval_mode=not facade.train_mode, module_is_rounded_x=S.rounded_equal(model),
                k=[g["k"] for g in facade.param_groups],
                vs_reference=S.max_diff(facade.eval_state_dict(), S.reference_run(STEPS, mode, clip=clip)),
                clip_moves_reference=S.max_diff(S.reference_run(STEPS, mode, clip=clip), S.reference_run(STEPS, mode))
                if clip else None)
        finally:
            model.destroy()

    for name, args in CASES.items():
        rec.case(name, lambda: case(name, *args))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return S.run_cases(_ranks, tmp_path_factory.mktemp("acc_ds"))


@pytest.mark.parametrize("case", list(CASES))
def test_accelerate_runs_deepspeed_with_ours_attached(results, case):
    for v in S.case_values(results, case):
        assert v["distributed"] == "DistributedType.DEEPSPEED" and v["engine"] == "DeepSpeedEngine", v
        assert v["facade"] == "DeepSpeedMSAMOptimizer", v


@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_equals_reference(results, case):
    for v in S.case_values(results, case):
        assert v["vs_reference"] <= TOL, v
        assert v["k"] == [STEPS] * len(v["k"]), v


@pytest.mark.parametrize("case", [c for c in CASES if "clip" in c])
def test_clipping_moves_the_reference(results, case):
    for v in S.case_values(results, case):
        assert v["clip_moves_reference"] > 1e-4, v


@pytest.mark.parametrize("case", list(CASES))
def test_eval_through_accelerates_wrapper_reaches_the_engine(results, case):
    for v in S.case_values(results, case):
        assert v["eval_mode"] and v["module_is_rounded_x"] == 0.0, v
