"""The optimizer built over params that ``deepspeed.zero.Init`` already partitioned, on 2 gloo ranks.

This is the order most ZeRO-3 users take (HF ``from_pretrained`` under an active ZeRO-3 config
builds the model inside ``zero.Init``): the params carry ``ds_id`` and hold no data (``numel() ==
0`` outside a gather) when the optimizer is built, so the back end comes from the ZeRO-3 rule and
is bound to the engine later. Two routes, both modes, against the single-process reference on the
same global batches (the tiny model of :mod:`tests.ds_scenarios`, two param groups):

- ``attach``: ours built as HF's ``create_optimizer`` builds it (no ``backend=``), handed to
  ``deepspeed.initialize(optimizer=...)``, then :func:`sharded_msam_sf.deepspeed.attach`;
- ``initialize``: :func:`sharded_msam_sf.deepspeed.initialize` with our optimizer in the config.

Each case checks that the model really was partitioned at construction, that it starts from the
reference's initial weights, the eval-mode trajectory (x), what ``engine.module`` computes with,
one step counter per engine step and one global ascent scale on every rank.
"""
import pytest

from tests import ds_scenarios as S
from tests.ds_scenarios import shm_op  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_op")]

STEPS = 3
TOL = 1e-5
CASES = {f"{route}/{mode}": (route, mode) for route in ("attach", "initialize") for mode in ("one_pass", "two_pass")}


def _ranks(rank, world, rec):
    import deepspeed
    import torch

    from sharded_msam_sf import AdamWMSAMScheduleFree
    from sharded_msam_sf.deepspeed import attach, initialize
    from sharded_msam_sf.deepspeed_config import client_config

    initial = {n: p.detach().clone() for n, p in S.make_model(0).named_parameters()}

    def partitioned_model(cfg):
        deepspeed.init_distributed(dist_backend="gloo")
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = S.make_model(0)
        params = list(model.parameters())
        return model, {"ds_id": all(hasattr(p, "ds_id") for p in params),
                       "empty": all(p.numel() == 0 for p in params)}

    def case(name, route, mode):
        cfg = S.ds_config(3, "fp32", mode)
        model, built = partitioned_model(cfg)
        rec(name, **built)
        p = cfg["optimizer"]["params"]
        if route == "attach":
            ours = AdamWMSAMScheduleFree(S.param_groups(model, p["lr"]), lr=p["lr"], rho=p["rho"],
                                         sam_mode=p["sam_mode"], betas=tuple(p["betas"]),
                                         weight_decay=p["weight_decay"], warmup_steps=p["warmup_steps"])
            rec(name, kind_at_construction=type(ours.backend).__name__)
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=ours, config=client_config(cfg))
            opt = attach(engine)
        else:
            engine, opt, _, _ = initialize(model=model, model_parameters=S.param_groups(model, p["lr"]), config=cfg)
        try:
            rec(name, vs_initial=S.max_diff(S.module_weights(engine), initial))
            opt.train()
            S.ds_train(engine, opt, STEPS, mode)
            rec(name, k=[g["k"] for g in opt.param_groups])
            if mode == "one_pass":
                rec(name, scales=[g["ascent_scale"] for g in opt.param_groups])
            opt.eval()
            control = S.reference_run(STEPS, mode)
            rec(name, vs_reference=S.max_diff(opt.eval_state_dict(), control),
                module_vs_reference=S.max_diff(S.module_weights(engine), control))
            torch.distributed.barrier()
        finally:
            engine.destroy()

    for name, (route, mode) in CASES.items():
        rec.case(name, lambda: case(name, route, mode))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return S.run_cases(_ranks, tmp_path_factory.mktemp("ds_zero_init"))


@pytest.mark.parametrize("case", list(CASES))
def test_model_was_partitioned_before_the_optimizer(results, case):
    for v in S.case_values(results, case):
        assert v["ds_id"] and v["empty"], v
        assert v["vs_initial"] == 0.0, v  # zero.Init built the reference's initial weights
        if case.startswith("attach/"):
            assert v["kind_at_construction"] == "DeepSpeedBackend", v


@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_equals_reference(results, case):
    for v in S.case_values(results, case):
        assert v["vs_reference"] <= TOL, v
        assert v["module_vs_reference"] <= TOL, v  # engine.module computes with x after eval()


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_counter_per_engine_step_and_one_global_scale(results, case):
    values = S.case_values(results, case)
    for v in values:
        assert v["k"] == [STEPS] * len(v["k"]), v
    if case.endswith("one_pass"):
        scales = [v["scales"] for v in values]
        assert all(s == scales[0] for s in scales) and len(set(scales[0])) == 1, scales
        assert scales[0][0] < 0, scales  # one_pass: s = -rho/||m||
