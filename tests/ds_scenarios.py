"""Shared pieces of the DeepSpeed tests: a tiny model, the data, a DeepSpeed run and the
single-process reference run on the same global batch (imported by the rank functions)."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Dict, List, Optional

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from sharded_msam_sf import AdamWMSAMScheduleFree  # noqa: E402

IN, HID, OUT = 6, 10, 3
GLOBAL_BATCH = 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


SHM_BUILD_COMMAND = 'DS_ACCELERATOR=cpu python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"'
_shm_built = False


def build_shm_op() -> None:
    """Build DeepSpeed's CPU shm comm op once, in one process (two ranks building it at once can
    abort); a no-op when it is already in the torch extensions cache. Same as SHM_BUILD_COMMAND."""
    global _shm_built
    if _shm_built:
        return
    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, timeout=900)
    _shm_built = True


try:
    import pytest

    @pytest.fixture(scope="session")
    def shm_op():
        build_shm_op()
except ImportError:  # pragma: no cover
    pass


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(IN, HID)
        self.fc2 = torch.nn.Linear(HID, OUT)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def param_groups(model: torch.nn.Module, lr: float = 0.02) -> List[Dict[str, Any]]:
    """Two groups: the weights (with decay) and the biases (no decay, another lr)."""
    w = [p for n, p in model.named_parameters() if n.endswith("weight")]
    b = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": w, "weight_decay": 0.1}, {"params": b, "weight_decay": 0.0, "lr": lr * 0.5}]


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, IN, generator=g)
    y = torch.randn(GLOBAL_BATCH, OUT, generator=g)
    return x, y


def loss_fn(out, y):
    return torch.nn.functional.mse_loss(out.float(), y)


def ds_config(stage: int, dtype: str = "fp32", sam_mode: str = "one_pass", *, gas: int = 1, world: int = 2,
              clip: float = 0.0, sub_group_size: Optional[int] = None, lr: float = 0.02, rho: float = 0.05,
              bf16_optimizer: bool = False, persistence_threshold: Optional[int] = None) -> Dict[str, Any]:
    zero: Dict[str, Any] = {"stage": stage}
    if sub_group_size is not None:
        zero["sub_group_size"] = sub_group_size
    if persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = persistence_threshold
    cfg: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world // gas,
        "gradient_accumulation_steps": gas,
        "train_batch_size": GLOBAL_BATCH,
        "gradient_clipping": clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamWMSAMScheduleFree",
                      "params": {"lr": lr, "rho": rho, "sam_mode": sam_mode, "betas": [0.9, 0.99],
                                 "weight_decay": 0.1, "warmup_steps": 2}},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
        if bf16_optimizer:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000, "hysteresis": 1,
                       "min_loss_scale": 1}
    return cfg


def reference_run(steps, sam_mode: str, *, switch_at: Optional[int] = None, clip: float = 0.0, lr: float = 0.02,
                  rho: float = 0.05, skip_steps=()) -> Dict[str, torch.Tensor]:
    """The single-process optimizer on the whole global batch; returns the eval-mode (x) weights."""
    model = make_model()
    opt = AdamWMSAMScheduleFree(param_groups(model, lr), lr=lr, rho=rho, sam_mode=sam_mode, betas=(0.9, 0.99),
                                weight_decay=0.1, warmup_steps=2)
    opt.train()
    for k in range(steps):
        if k == switch_at:
            opt.eval()
            opt.train()
        if k in skip_steps:
            continue
        x, y = batch(k)

        def backward():
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)

        backward()
        if sam_mode == "two_pass":
            opt.move_to_ascent()
            backward()
            opt.move_from_ascent()
        opt.step()
    opt.eval()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def ds_train(engine, opt, steps, sam_mode: str, *, start: int = 0, gas: int = 1, switch_at: Optional[int] = None,
             inf_at=(), world: Optional[int] = None):
    """DeepSpeed's loop on this rank's share of the global batch."""
    world = world or dist.get_world_size()
    rank = dist.get_rank()
    dtype = next(engine.module.parameters()).dtype
    applied = []
    for k in range(start, steps):
        if k == switch_at:
            opt.eval()
            opt.train()
        x, y = batch(k)
        per = GLOBAL_BATCH // world
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        micro = per // gas
        for j in range(gas):
            xm, ym = xs[j * micro:(j + 1) * micro].to(dtype), ys[j * micro:(j + 1) * micro]
            loss = loss_fn(engine(xm), ym)
            if k in inf_at:
                loss = loss * float("inf")
            engine.backward(loss)
            if sam_mode == "two_pass":
                opt.move_to_ascent()
                engine.backward(loss_fn(engine(xm), ym))
                opt.move_from_ascent()
            engine.step()
        applied.append(engine.was_step_applied())
    return applied


def module_weights(engine) -> Dict[str, torch.Tensor]:
    """What engine.module computes with (gathered under ZeRO-3), as float32 copies."""
    import deepspeed
    params = list(engine.module.parameters())
    out = {}
    if hasattr(params[0], "ds_id"):
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for n, p in engine.module.named_parameters():
                out[n] = p.detach().float().clone()
    else:
        for n, p in engine.module.named_parameters():
            out[n] = p.detach().float().clone()
    return out


def master_weights(engine) -> Dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param
    return {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in engine.module.named_parameters()}


def max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def rounded_equal(engine) -> float:
    """max |bit16 − round(master)|: the bit16 weights must be the fp32 masters rounded."""
    lp, hp = module_weights(engine), master_weights(engine)
    dtype = next(engine.module.parameters()).dtype
    return max(float((lp[k] - hp[k].to(dtype).float()).abs().max()) for k in lp)


def allow_cpu_fp16() -> None:
    """DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has native fp16 (AVX512-FP16/AMX);
    torch computes fp16 on any CPU, and DeepSpeed's fp16 ZeRO path (loss scaling, overflow
    skip) is device-independent, so the tests lift that check on machines without it."""
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() == "cpu" and not acc.is_fp16_supported():
        acc.is_fp16_supported = lambda: True


def make_engine(cfg, seed: int = 0):
    from sharded_msam_sf.deepspeed import initialize
    model = make_model(seed)
    dtype = DTYPES["bf16" if cfg.get("bf16", {}).get("enabled") else "fp16" if cfg.get("fp16", {}).get("enabled") else "fp32"]
    lr = cfg["optimizer"]["params"]["lr"]
    if dtype == torch.float16:
        allow_cpu_fp16()
    engine, opt, _, _ = initialize(model=model, model_parameters=param_groups(model, lr), config=cfg)
    assert next(engine.module.parameters()).dtype == dtype
    return engine, opt
