"""Communication per ZeRO step: our optimizer adds one all-reduce of a few scalars to a one_pass
step and nothing else, against the same config with torch.optim.AdamW (2 gloo ranks)."""
import json

import pytest

from tests.ds_scenarios import shm_op  # noqa: F401
from tests.harness import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_op")]


def measure(S, stage, dtype, which, steps=3):
    """Collectives per engine step (forward+backward and step counted apart), as dicts."""
    import deepspeed
    import torch
    from sharded_msam_sf.comm_count import CommCounter
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


def _comm_ranks(rank, world, out_path):
    from tests import ds_scenarios as S
    results = {}
    for stage, dtype in ((1, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")):
        ours_fb, ours_step = measure(S, stage, dtype, "ours")
        adamw_fb, adamw_step = measure(S, stage, dtype, "adamw")
        results[f"zero{stage}/{dtype}"] = {"ours": {"fwd_bwd": ours_fb, "step": ours_step},
                                          "adamw": {"fwd_bwd": adamw_fb, "step": adamw_step}}
        assert ours_fb == adamw_fb, (stage, dtype, ours_fb, adamw_fb)
        extra = {k: {"calls": ours_step.get(k, {}).get("calls", 0) - adamw_step.get(k, {}).get("calls", 0),
                     "bytes": ours_step.get(k, {}).get("bytes", 0) - adamw_step.get(k, {}).get("bytes", 0)}
                 for k in set(ours_step) | set(adamw_step)}
        extra = {k: v for k, v in extra.items() if v["calls"] or v["bytes"]}
        # one all-reduce of [sumsq_group0, sumsq_group1, nonfinite] in float64
        assert extra == {"all_reduce": {"calls": 1, "bytes": 3 * 8}}, (stage, dtype, extra)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


def test_one_pass_step_adds_one_scalar_all_reduce_vs_adamw(tmp_path):
    out = tmp_path / "comm.json"
    run_ranks(_comm_ranks, 2, str(out), timeout=400)
    print(json.dumps(json.loads(out.read_text())))
