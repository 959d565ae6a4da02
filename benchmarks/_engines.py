"""Shared by memory.py and comm.py: spawn N gloo ranks on the CPU, build a fixed model
under an engine (DeepSpeed ZeRO-1/2/3, FSDP2, DDP) with our optimizer or AdamW, run steps.

Every rank binds to 127.0.0.1; DeepSpeed runs with ``DS_ACCELERATOR=cpu``.
"""
from __future__ import annotations

import os
from typing import Any, Dict

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from sharded_msam_sf.backends import is_dtensor  # noqa: E402
from sharded_msam_sf.testing.local_ranks import run_ranks as _run_ranks  # noqa: E402

BATCH = 4  # per rank


def run_ranks(fn, world: int, *args) -> Dict[int, Any]:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks (the tests' harness, 30 min limit): {rank: result}."""
    return _run_ranks(fn, world, *args, timeout=1800.0)


# ----------------------------------------------------------------------------- model
class MLP(torch.nn.Module):
    def __init__(self, width: int, layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def make_model(width: int, layers: int) -> MLP:
    torch.manual_seed(0)
    return MLP(width, layers)


def n_params(width: int, layers: int) -> int:
    return layers * (width * width + width)


def batch(step: int, width: int, world: int, rank: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH * world, width, generator=g)
    y = torch.randn(BATCH * world, width, generator=g)
    return x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]


def ds_config(stage: int, world: int) -> Dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
            "train_batch_size": BATCH * world, "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


OPTS = {  # name -> (ours?, kwargs)
    "ours": (True, dict(lr=0.0025, weight_decay=0.1)),
    "ours_bf16": (True, dict(lr=0.0025, weight_decay=0.1, state_dtype=torch.bfloat16)),
    "ours_two_pass": (True, dict(lr=0.0025, weight_decay=0.1, sam_mode="two_pass")),
    "adamw": (False, dict(lr=0.001, weight_decay=0.1)),
}


class Run:
    """An engine + optimizer on this rank: ``step(k)`` runs forward/backward/step;
    ``client`` is the torch optimizer that holds the state."""

    def __init__(self, engine_name: str, opt_name: str, width: int, layers: int, world: int, rank: int):
        from sharded_msam_sf import AdamWMSAMScheduleFree
        self.engine_name, self.opt_name, self.width, self.world, self.rank = engine_name, opt_name, width, world, rank
        ours, kw = OPTS[opt_name]
        model = make_model(width, layers)
        self.ds = engine_name.startswith("zero")
        self.wrapper = None
        if self.ds:
            import deepspeed
            stage = int(engine_name[-1])
            params = list(model.parameters())
            if ours:
                from sharded_msam_sf.backends.zero import DeepSpeedBackend
                client = AdamWMSAMScheduleFree(params, backend=DeepSpeedBackend(), **kw)
            else:
                client = torch.optim.AdamW(params, **kw)
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=client,
                                                   config=ds_config(stage, world))
            if ours:
                from sharded_msam_sf.deepspeed import attach
                self.wrapper = attach(engine)
                self.wrapper.train()
            self.engine, self.client, self.module = engine, client, engine.module
        else:
            if engine_name == "fsdp2":
                from torch.distributed.fsdp import fully_shard
                for layer in model.layers:
                    fully_shard(layer)
                fully_shard(model)
            elif engine_name == "ddp":
                model = torch.nn.parallel.DistributedDataParallel(model)
            client = AdamWMSAMScheduleFree(model.parameters(), **kw) if ours else torch.optim.AdamW(
                model.parameters(), **kw)
            if ours:
                client.train()
            self.engine, self.client, self.module = None, client, model

    def forward_backward(self, k: int):
        x, y = batch(k, self.width, self.world, self.rank)
        if self.ds:
            loss = torch.nn.functional.mse_loss(self.engine(x), y)
            self.engine.backward(loss)
        else:
            loss = torch.nn.functional.mse_loss(self.module(x), y)
            loss.backward()

    def optimizer_step(self):
        if self.ds:
            self.engine.step()
        else:
            self.client.step()
            self.client.zero_grad(set_to_none=True)

    def step(self, k: int):
        self.forward_backward(k)
        if self.opt_name == "ours_two_pass":
            api = self.wrapper if self.ds else self.client
            api.move_to_ascent()
            self.forward_backward(k)
            api.move_from_ascent()
        self.optimizer_step()

    def close(self):
        if self.ds:
            self.engine.destroy()


def local_bytes(t) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    loc = t.to_local() if is_dtensor(t) else t
    return loc.numel() * loc.element_size()


def state_bytes(client) -> int:
    """Bytes of optimizer state (all tensors in ``client.state``, local shards) on this rank."""
    return sum(local_bytes(v) for s in client.state.values() for v in s.values())


def master_bytes(run: "Run") -> int:
    """Bytes of fp32 master partitions DeepSpeed keeps on this rank besides the model's params."""
    if not run.ds:
        return 0
    z = run.engine.optimizer
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        groups = getattr(z, attr, None)
        if groups:
            return sum(local_bytes(t) for t in groups)
    return 0
