"""torchtitan 0.3 on the CPU (its Trainer needs CUDA and its data stack; what runs here is its optimizer and
checkpoint machinery): :class:`sharded_msam_sf.integrations.torchtitan.MSAMOptimizersContainer` built by
``msam_optimizer(...).build(model_parts=...)`` on an FSDP2 model on 2 gloo ranks, torchtitan's constant
``LRSchedulersContainer`` and its DCP ``CheckpointManager`` with :func:`schedule_free_hooks`: the trajectory
equals the single-process reference on the global batch, the saved model weights are x, and a resume from
the step-2 checkpoint (its zero-lr state-init step included) ends bit-exact on the uninterrupted run."""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("torchtitan.components.optimizer")

from sharded_msam_sf import AdamWMSAMScheduleFree  # noqa: E402
from tests.harness import run_ranks  # noqa: E402
from tests.models import batch, mse, tiny_mlp  # noqa: E402

HP = dict(lr=0.02, rho=0.5, warmup_steps=2, weight_decay=0.1)
STEPS, SAVE_AT, N, TOL = 4, 2, 16, 1e-6


def reference():
    """{k: x after k steps} of the plain one_pass loop on the whole batch."""
    model = tiny_mlp()
    opt = AdamWMSAMScheduleFree(model.parameters(), **HP)
    x, y = batch(n=N)
    out = {}
    opt.train()
    for k in range(1, STEPS + 1):
        mse(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        opt.eval()
        out[k] = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.train()
    return out


def _run(rank, world, folder, resume):
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.checkpointer.dcp import CheckpointManager

    from sharded_msam_sf.integrations.torchtitan import (MSAMOptimizersContainer, constant_lr, msam_optimizer,
                                                         schedule_free_hooks)
    model = tiny_mlp()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opts = msam_optimizer(**HP).build(model_parts=[model])
    assert isinstance(opts, MSAMOptimizersContainer) and len(opts) == 1
    scheds = constant_lr().build(optimizers=opts, training_steps=STEPS)
    ck = CheckpointManager(CheckpointManager.Config(enable=True, folder="ckpt", interval=SAVE_AT,
                                                    last_save_model_only=False),
                           dataloader=None, model_parts=[model], optimizers=opts, lr_schedulers=scheds,
                           states={}, sd_adapter=None, base_folder=folder)
    trainer = schedule_free_hooks(types.SimpleNamespace(optimizers=opts, checkpointer=ck, validator=None))
    start = 0
    if resume:
        assert trainer.checkpointer.load(step=SAVE_AT)
        start = SAVE_AT
        assert [g["k"] for g in opts.optimizer.param_groups] == [SAVE_AT]  # not off by the init step
    x, y = batch(n=N)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    lrs = []
    for step in range(start + 1, STEPS + 1):
        mse(model, xs, ys).backward()
        opts.step()
        scheds.step()
        opts.zero_grad()
        lrs.append(opts.optimizer.param_groups[0]["lr"])
        if not resume:
            trainer.checkpointer.save(step, last_step=step == STEPS)
        assert all(g["train_mode"] for g in opts.optimizer.param_groups)  # back to y after each save
    opts.eval()
    final = {n: p.full_tensor().detach().clone().tolist() for n, p in model.named_parameters()}
    return dict(final=final, lrs=lrs, k=[g["k"] for g in opts.optimizer.param_groups])


def _ranks(rank, world, folder):
    return dict(full=_run(rank, world, folder, False), resumed=_run(rank, world, folder, True))


def test_container_on_fsdp2_dcp_save_resume(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    runs = run_ranks(_ranks, 2, str(tmp_path), timeout=300)
    ref = reference()
    for rank, r in runs.items():
        full, resumed = r["full"], r["resumed"]
        assert full["lrs"] == [HP["lr"]] * STEPS, full["lrs"]  # constant: the scheduler leaves lr alone
        diff = max((torch.tensor(full["final"][n]) - ref[STEPS][n]).abs().max().item() for n in ref[STEPS])
        assert diff <= TOL, (rank, diff)
        assert resumed["final"] == full["final"], rank
        assert resumed["k"] == full["k"] == [STEPS], (resumed["k"], full["k"])
    dcp_to_torch_save(str(tmp_path / "ckpt" / f"step-{SAVE_AT}"), str(tmp_path / "saved.pt"))
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    weights = {n: saved[n] for n in ref[SAVE_AT]}
    diff = max((weights[n] - ref[SAVE_AT][n]).abs().max().item() for n in ref[SAVE_AT])
    assert diff <= TOL, diff  # the checkpoint holds x
    final = max((torch.tensor(runs[0]["full"]["final"][n]) - ref[STEPS][n]).abs().max().item() for n in ref[STEPS])
    print(f"MAXDIFF torchtitan fsdp2 one_pass final {final:.2e} saved step-{SAVE_AT} x {diff:.2e}")
