"""Accelerate (DDP on 2 gloo CPU ranks): ``accelerator.prepare`` with the model and the optimizer in
either order; ``train()``/``eval()`` through Accelerate's ``AcceleratedOptimizer``, both modes; the
trajectory equals the single-process one on the global batches. (Accelerate turns FSDP on only on
GPUs; the CPU check of what its FSDP path does to the optimizer — ``fully_shard``, then the params
swapped by name — is in tests/test_late_binding.py.)"""
from __future__ import annotations

import pytest

pytest.importorskip("accelerate")

from tests import sharded_common as C  # noqa: E402
from tests.harness import run_ranks  # noqa: E402

MODES = ("one_pass", "two_pass")
ORDERS = ("model_first", "optimizer_first")


def _run(rank, world_size, mode, order, steps=6):
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    base = C.make_model(seed=3)
    ref, model = C.clone_model(base), C.clone_model(base)
    opt = C.AdamWMSAMScheduleFree(model.parameters(), sam_mode=mode, **C.HP)
    if order == "model_first":
        model, opt = acc.prepare(model, opt)
    else:
        opt, model = acc.prepare(opt, model)
    inner = opt.optimizer
    opt.train()
    model.train()
    for i in range(steps):
        x, y = C.global_batch(i)
        x, y = C.local_slice(x, rank, world_size), C.local_slice(y, rank, world_size)
        acc.backward(C.mse(model, x, y))
        if mode == "two_pass":
            inner.move_to_ascent()
            acc.backward(C.mse(model, x, y))
            inner.move_from_ascent()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 2:   # an eval -> train switch through Accelerate's wrapper
            opt.eval()
            opt.train()
    opt.eval()
    ref_opt = C.AdamWMSAMScheduleFree(ref.parameters(), sam_mode=mode, **C.HP)
    C.run_loop(ref, ref_opt, mode=mode, steps=steps, dp_rank=0, dp_size=1, switch_at=None)
    mine = {k: v.detach().float() for k, v in acc.unwrap_model(model).state_dict().items()}
    theirs = {k: v.detach().float() for k, v in ref.state_dict().items()}
    out = dict(distributed=str(acc.distributed_type), wrapped=type(model).__name__,
               backend=type(inner.backend).__name__, diff=C.max_abs_diff(mine, theirs),
               moved=C.max_abs_diff(theirs, {k: v.detach().float() for k, v in base.state_dict().items()}),
               eval_mode=not any(g["train_mode"] for g in inner.param_groups))
    del model, opt, inner, acc
    return out


def _ranks(rank, world_size):
    return {(mode, order): _run(rank, world_size, mode, order) for mode in MODES for order in ORDERS}


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_ranks, 2, timeout=240)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", MODES)
def test_prepare_in_either_order_equals_single_process(runs, mode, order):
    for rank, r in runs.items():
        r = r[(mode, order)]
        assert "MULTI_CPU" in r["distributed"] and r["wrapped"] == "DistributedDataParallel", (rank, r)
        assert r["eval_mode"], (rank, "AcceleratedOptimizer.eval() did not reach the optimizer")
        assert r["moved"] > 1e-3 and r["diff"] <= C.TOL, (rank, r["diff"])
    print(f"MAXDIFF accelerate-ddp {mode} {order} {runs[0][(mode, order)]['diff']:.3e}")
