"""Communication per ZeRO step: our optimizer adds one all-reduce of a few scalars to a one_pass
step and nothing else, against the same config with torch.optim.AdamW (2 gloo ranks)."""
import pytest

from tests.ds_scenarios import shm_op  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_op")]


def measure(S, stage, dtype, which, steps=3):
    """Collectives per engine step (forward+backward and step counted apart), as dicts."""
    import deepspeed
    import torch
    from sharded_msam_sf.testing.comm_count import CommCounter
    cfg = S.ds_config(stage, dtype, "one_pass")
    with CommCounter() as cc:
        if which == "ours":
            engine, opt = S.make_engine(cfg)
            opt.train()
        else:
            model = S.make_model()
            cfg.pop("optimizer")
            cfg["zero_allow_untested_optimizer"] = True
            engine, _, _, _ = deepspeed.initialize(model=model, config=cfg,
                                                   optimizer=torch.optim.AdamW(S.param_groups(model), lr=0.01))
        dtype_ = next(engine.module.parameters()).dtype
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        per = S.GLOBAL_BATCH // world
        for k in range(steps):
            x, y = S.batch(k)
            cc.reset()
            engine.backward(S.loss_fn(engine(x[rank * per:(rank + 1) * per].to(dtype_)), y[rank * per:(rank + 1) * per]))
            fwd_bwd = cc.summary()
            cc.reset()
            engine.step()
            step = cc.summary()
    engine.destroy()
    return fwd_bwd, step


CASES = {f"zero{stage}/{dtype}": (stage, dtype) for stage, dtype in ((1, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16"))}


def _comm_ranks(rank, world, rec):
    from tests import ds_scenarios as S

    def run(name, stage, dtype):
        ours_fb, ours_step = measure(S, stage, dtype, "ours")
        adamw_fb, adamw_step = measure(S, stage, dtype, "adamw")
        rec(name, ours={"fwd_bwd": ours_fb, "step": ours_step}, adamw={"fwd_bwd": adamw_fb, "step": adamw_step})

    for name, args in CASES.items():
        rec.case(name, lambda: run(name, *args))


@pytest.fixture(scope="module")
def comm_runs(tmp_path_factory):
    from tests import ds_scenarios as S
    return S.run_cases(_comm_ranks, tmp_path_factory.mktemp("ds_comm"))


@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_communicates_as_with_adamw(comm_runs, case):
    from tests import ds_scenarios as S
    for r, v in enumerate(S.case_values(comm_runs, case)):
        assert v["ours"]["fwd_bwd"] == v["adamw"]["fwd_bwd"], (r, v)


@pytest.mark.parametrize("case", list(CASES))
def test_one_pass_step_adds_one_scalar_all_reduce_vs_adamw(comm_runs, case):
    from tests import ds_scenarios as S
    for r, v in enumerate(S.case_values(comm_runs, case)):
        ours, adamw = v["ours"]["step"], v["adamw"]["step"]
        extra = {k: {"calls": ours.get(k, {}).get("calls", 0) - adamw.get(k, {}).get("calls", 0),
                     "bytes": ours.get(k, {}).get("bytes", 0) - adamw.get(k, {}).get("bytes", 0)}
                 for k in set(ours) | set(adamw)}
        extra = {k: e for k, e in extra.items() if e["calls"] or e["bytes"]}
        # one all-reduce of [sumsq_group0, sumsq_group1, nonfinite] in float64
        assert extra == {"all_reduce": {"calls": 1, "bytes": 3 * 8}}, (r, extra)
