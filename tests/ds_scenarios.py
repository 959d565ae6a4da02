"""Shared pieces of the DeepSpeed tests: a tiny model, the data, a DeepSpeed run, the
single-process control on the same global batch (fp32, or under the same bf16 precision policy),
and :func:`run_cases`, which runs many cases in one 2-rank start-up and returns each case's
measurements per rank, so that every pytest function asserts one behaviour."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional

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
                  rho: float = 0.05, skip_steps=(), dtype: str = "fp32", world: int = 2,
                  loss_scales: Optional[Dict[int, float]] = None,
                  nan_at: Optional[Dict[int, str]] = None, make: Callable[[], torch.nn.Module] = None
                  ) -> Dict[str, torch.Tensor]:
    """The single-process optimizer on the whole global batch; returns the eval-mode (x) weights.

    ``dtype="bf16"``: the control under DeepSpeed's bf16 precision policy. DeepSpeed casts the
    model to bf16 and makes its fp32 masters from those weights, so the control starts from the
    initial weights rounded to bf16. The optimizer keeps fp32 masters; forward and backward run on
    a bf16 copy whose weights are the masters rounded to nearest even (DeepSpeed's fp32 → bf16
    copy), one backward per rank's share of the batch (as each rank computes its bf16 gradient),
    summed in bf16 and divided by ``world`` (DeepSpeed's gradient reduction), handed to the
    optimizer as fp32 gradients. DeepSpeed's bf16 runs equal this control to the last bit or so
    (see ``CONTROL_TOL``).
    ``dtype="fp16"``: the same, with the loss multiplied by ``loss_scales[k]`` (default 1) before
    the fp16 backward of step ``k`` and the gradient divided by it after the reduction.
    ``nan_at={k: "first" or "second"}``: that pass of step ``k`` gives NaN gradients (two_pass:
    "first" is the ascent pass); ``skip_steps``: steps left out altogether. ``make``: the model
    (default :func:`make_model`; its trainable params grouped by :func:`param_groups`)."""
    model = (make or make_model)()
    if dtype != "fp32":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(DTYPES[dtype]).float())
    opt = AdamWMSAMScheduleFree(param_groups(model, lr), lr=lr, rho=rho, sam_mode=sam_mode, betas=(0.9, 0.99),
                                weight_decay=0.1, warmup_steps=2)
    low = None if dtype == "fp32" else copy.deepcopy(model).to(DTYPES[dtype])
    opt.train()
    for k in range(steps):
        if k == switch_at:
            opt.eval()
            opt.train()
        if k in skip_steps:
            continue
        x, y = batch(k)

        def backward(which):
            model.zero_grad(set_to_none=True)
            if low is None:
                loss_fn(model(x), y).backward()
            else:
                _low_precision_grads(model, low, x, y, world, (loss_scales or {}).get(k, 1.0))
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if (nan_at or {}).get(k) == which:
                for p in model.parameters():
                    p.grad.fill_(float("nan"))

        backward("first")
        if sam_mode == "two_pass":
            opt.move_to_ascent()
            backward("second")
            opt.move_from_ascent()
        opt.step()
    opt.eval()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# DeepSpeed's runs against the same-precision control: the same math on the same rounded inputs,
# but some sums run in another order (e.g. ||m|| in float64 over flat partitions instead of per
# tensor), which can flip the last bit of a weight: allowed a few fp32 ulps of weights below 1
# (measured: 0, and 2.3e-10 once, for ZeRO-3 fp16)
CONTROL_TOL = 1e-7


def _low_precision_grads(model, low, x, y, world: int, scale: float = 1.0) -> None:
    """``p.grad`` (fp32) of the fp32 ``model`` as DeepSpeed forms it: each of the ``world`` shares
    of the batch gives its gradient on ``low`` (weights: the params rounded), in ``low``'s dtype;
    they are summed and rounded to that dtype (the reduction), then divided by ``world`` (exact)."""
    with torch.no_grad():
        for pl, p in zip(low.parameters(), model.parameters()):
            pl.copy_(p)
    per = GLOBAL_BATCH // world
    total = [torch.zeros_like(p) for p in model.parameters()]
    dtype = next(low.parameters()).dtype
    for r in range(world):
        low.zero_grad(set_to_none=True)
        (loss_fn(low(x[r * per:(r + 1) * per].to(dtype)), y[r * per:(r + 1) * per]) * scale).backward()
        for t, pl in zip(total, low.parameters()):
            t.add_(pl.grad.float())
    for p, t in zip(model.parameters(), total):
        p.grad = t.to(dtype).float() / world / scale


def ds_train(engine, opt, steps, sam_mode: str, *, start: int = 0, gas: int = 1, switch_at: Optional[int] = None,
             inf_at=(), inf_pass: str = "first", world: Optional[int] = None, rank: Optional[int] = None):
    """DeepSpeed's loop on this rank's share of the global batch. At the steps in ``inf_at`` the
    loss is multiplied by inf: in the first pass (two_pass: the ascent pass) or the ``"second"``.
    ``world``/``rank``: the data-parallel size and rank (default: the world's; under tensor
    parallelism the tensor-parallel ranks of one data-parallel rank take the same share)."""
    world = world or dist.get_world_size()
    rank = dist.get_rank() if rank is None else rank
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
            if k in inf_at and inf_pass == "first":
                loss = loss * float("inf")
            engine.backward(loss)
            if sam_mode == "two_pass":
                opt.move_to_ascent()
                loss2 = loss_fn(engine(xm), ym)
                if k in inf_at and inf_pass == "second":
                    loss2 = loss2 * float("inf")
                engine.backward(loss2)
                opt.move_from_ascent()
            engine.step()
        applied.append(engine.was_step_applied())
    return applied


def module_weights(engine) -> Dict[str, torch.Tensor]:
    """What engine.module computes with (gathered under ZeRO-3), as float32 copies."""
    from sharded_msam_sf.deepspeed import gathered
    with gathered(engine.module.parameters()):
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def master_weights(engine) -> Dict[str, torch.Tensor]:
    """The fp32 masters, full (the one export: sharded_msam_sf.deepspeed.full_fp32_state_dict)."""
    from sharded_msam_sf.deepspeed import full_fp32_state_dict
    return full_fp32_state_dict(engine.module)


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


def make_engine_elsewhere(cfg, seed: int = 0):
    """``deepspeed.initialize(optimizer=ours)`` with ours built as HF's create_optimizer does (no
    ``backend=``), the engine not attached: ``(engine, optimizer)``."""
    import deepspeed

    from sharded_msam_sf.deepspeed.ds_config import client_config
    model = make_model(seed)
    p = cfg["optimizer"]["params"]
    opt = AdamWMSAMScheduleFree(param_groups(model, p["lr"]), lr=p["lr"], rho=p["rho"], sam_mode=p["sam_mode"],
                                betas=tuple(p["betas"]), weight_decay=p["weight_decay"],
                                warmup_steps=p["warmup_steps"])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=client_config(cfg))
    return engine, opt


# ---------------------------------------------------------------------- many cases, one start-up
def _cases_entry(rank: int, world: int, fn: Callable, out_dir: str, args: tuple) -> None:
    """Rank entry of :func:`run_cases`: ``fn(rank, world, record, *args)``; ``record(case, **values)``
    stores a case's measurements. A case that raises is stored with its traceback and the others
    still run (the exception is the same on every rank when the code is, so no rank is left waiting
    in a collective)."""
    torch.set_num_threads(1)
    results: Dict[str, Dict[str, Any]] = {}

    class Recorder:
        def __call__(self, case: str, **values: Any) -> None:
            results.setdefault(case, {}).update(values)

        def case(self, name: str, body: Callable[[], None]) -> None:
            try:
                body()
            except Exception:  # noqa: BLE001 - reported by the pytest function of this case
                results.setdefault(name, {})["error"] = traceback.format_exc()

    fn(rank, world, Recorder(), *args)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)


def run_cases(fn: Callable, out_dir, *args: Any, world: int = 2, timeout: float = 600) -> Dict[int, Dict[str, Any]]:
    """Run ``fn(rank, world, recorder, *args)`` on ``world`` gloo ranks (one process start-up for
    many cases); return ``{rank: {case: {quantity: value}}}``. Every rank's values are returned,
    so that the pytest functions check every rank."""
    from tests.harness import run_ranks
    os.makedirs(out_dir, exist_ok=True)
    run_ranks(_cases_entry, world, fn, str(out_dir), args, timeout=timeout)
    out = {}
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            out[r] = json.load(f)
    return out


def case_values(results: Dict[int, Dict[str, Any]], case: str) -> List[Dict[str, Any]]:
    """The measurements of ``case`` on every rank; fails with the traceback if it raised on a rank."""
    per_rank = []
    for r in sorted(results):
        values = results[r].get(case)
        assert values is not None, f"rank {r}: case {case!r} was not run"
        assert "error" not in values, f"rank {r}: case {case!r} raised:\n{values['error']}"
        per_rank.append(values)
    return per_rank
