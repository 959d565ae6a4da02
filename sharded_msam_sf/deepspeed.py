"""Plug AdamWMSAMScheduleFree into DeepSpeed through its JSON config.

::

    from sharded_msam_sf.deepspeed import initialize
    engine, optimizer, _, _ = initialize(model=model, config="configs/deepspeed/zero2-cpu.json")
    optimizer.train()
    for x, y in data:                      # one_pass: DeepSpeed's loop, unchanged
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
    optimizer.eval()                       # engine.module now computes with the averaged x

The config is an ordinary DeepSpeed config whose optimizer section names ours::

    "optimizer": {"type": "AdamWMSAMScheduleFree",
                  "params": {"lr": 0.0025, "rho": 1.0, "sam_mode": "one_pass", "weight_decay": 0.1}}

That section is validated by :func:`sharded_msam_sf.config.optimizer_kwargs_from_config`
(unknown keys and bad values are :class:`~sharded_msam_sf.config.ConfigError`\\ s naming
the key) and removed; everything else goes to ``deepspeed.initialize`` untouched,
with ``zero_allow_untested_optimizer`` set. The second element of the returned tuple
is a :class:`DeepSpeedMSAMOptimizer`: our API (``train``/``eval``/``move_to_ascent``/
``move_from_ascent``/``state_dict``) acting on the engine's weights; ``engine.step()``
stays the step. two_pass::

    loss = engine(x, y); engine.backward(loss)
    optimizer.move_to_ascent()
    loss2 = engine(x, y); engine.backward(loss2)
    optimizer.move_from_ascent()
    engine.step()
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist

from .backends.deepspeed import DeepSpeedBackend, DeepSpeedDriver
from .config import ConfigError, is_our_optimizer, optimizer_kwargs_from_config
from .optimizer import AdamWMSAMScheduleFree

__all__ = ["initialize", "init_distributed", "load_config", "DeepSpeedMSAMOptimizer", "ConfigError"]

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def load_config(config: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
    """A DeepSpeed config from a JSON file path or a dict (a deep copy: the caller's is not changed)."""
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config: file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config: {path} is not valid JSON: {e}") from None
    elif isinstance(config, Mapping):
        data = copy.deepcopy(dict(config))
    else:
        raise ConfigError(f"config: expected a JSON file path or a dict, got {type(config).__name__}")
    if not isinstance(data, dict):
        raise ConfigError("config: must be a JSON object")
    return data


def init_distributed(dist_backend: Optional[str] = None, **kwargs: Any) -> None:
    """``deepspeed.init_distributed`` with the ranks and rendezvous of whichever launcher started us.

    :func:`sharded_msam_sf.launch_env.export` reads torchrun, the deepspeed launcher, mpirun
    (Open MPI, MPICH/Hydra, MVAPICH, PMIx) or srun, and sets RANK/WORLD_SIZE/LOCAL_RANK and
    MASTER_ADDR/MASTER_PORT (a MASTER_ADDR/PORT you set is kept; an MPI launch across nodes
    gets rank 0's address over mpi4py, as DeepSpeed's ``mpi_discovery`` does). No-op for the
    environment if a process group exists.
    """
    import deepspeed
    if not (dist.is_available() and dist.is_initialized()):
        from .launch_env import export
        if "distributed_port" in kwargs:
            os.environ.setdefault("MASTER_PORT", str(kwargs["distributed_port"]))
        export()
    deepspeed.init_distributed(dist_backend=dist_backend, **kwargs)


def _check_deepspeed_config(ds: Dict[str, Any], sam_mode: str) -> None:
    zero = ds.get("zero_optimization", {}) or {}
    if not isinstance(zero, Mapping):
        raise ConfigError("zero_optimization: must be a JSON object")
    if zero.get("elastic_checkpoint"):
        raise ConfigError("zero_optimization.elastic_checkpoint: not supported with AdamWMSAMScheduleFree "
                          "(an elastic checkpoint drops the optimizer's per-group step counters); set it to false")
    for key in ("offload_optimizer", "offload_param"):
        dev = (zero.get(key) or {}).get("device") if isinstance(zero.get(key), Mapping) else None
        if dev == "nvme":
            raise ConfigError(f"zero_optimization.{key}.device: 'nvme' is not supported with AdamWMSAMScheduleFree")
    gas = ds.get("gradient_accumulation_steps", 1)
    if sam_mode == "two_pass" and isinstance(gas, int) and gas > 1:
        raise ConfigError("gradient_accumulation_steps: two_pass needs 1 (each backward pass is a whole "
                          "step's gradient); use one_pass with gradient accumulation")


def initialize(model: torch.nn.Module = None,
               model_parameters: Optional[Iterable[Any]] = None,
               config: Union[str, os.PathLike, Mapping[str, Any], None] = None,
               *,
               dist_backend: Optional[str] = None,
               **kwargs: Any):
    """``deepspeed.initialize`` with our optimizer named in the config.

    Returns DeepSpeed's ``(engine, optimizer, dataloader, lr_scheduler)``, where
    ``optimizer`` is a :class:`DeepSpeedMSAMOptimizer`. ``model_parameters`` (params or
    param-group dicts, default: the model's trainable params) become the optimizer's
    param groups. Other keyword arguments (``training_data``, ``lr_scheduler``,
    ``mpu``, ``collate_fn``, ...) go to ``deepspeed.initialize``. A config whose
    optimizer is not ours is handed to ``deepspeed.initialize`` as it is.
    """
    if config is None:
        config = kwargs.pop("config_params", None)
    if config is None:
        raise ConfigError("config: missing (a DeepSpeed JSON path or dict with an \"optimizer\" section)")
    if "optimizer" in kwargs and kwargs["optimizer"] is not None:
        raise ValueError("initialize() builds the optimizer from the config's optimizer section; "
                         "do not pass optimizer=")
    kwargs.pop("optimizer", None)
    if model is None:
        raise ValueError("initialize() needs model=")
    ds = load_config(config)
    section = ds.get("optimizer")
    if section is None:
        raise ConfigError('optimizer: missing (add "optimizer": {"type": "AdamWMSAMScheduleFree", "params": {...}})')
    if isinstance(section, Mapping) and "type" in section and not is_our_optimizer(section):
        import deepspeed  # someone else's optimizer: DeepSpeed's business
        init_distributed(dist_backend)
        return deepspeed.initialize(model=model, model_parameters=model_parameters, config=ds, **kwargs)
    opt_kwargs = optimizer_kwargs_from_config(section)
    sam_mode = opt_kwargs.get("sam_mode", "one_pass")
    _check_deepspeed_config(ds, sam_mode)
    del ds["optimizer"]
    ds.setdefault("zero_allow_untested_optimizer", True)
    zero = ds.get("zero_optimization") or {}
    if zero.get("offload_optimizer"):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)

    import deepspeed
    init_distributed(dist_backend)
    params = list(model_parameters) if model_parameters is not None else \
        [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamWMSAMScheduleFree(params, **opt_kwargs, backend=DeepSpeedBackend())
    engine, zero_opt, dataloader, lr_scheduler = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, config=ds, **kwargs)
    driver = DeepSpeedDriver(engine, optimizer)
    return engine, DeepSpeedMSAMOptimizer(engine, optimizer, driver), dataloader, lr_scheduler


class DeepSpeedMSAMOptimizer:
    """Our optimizer's API on a DeepSpeed engine's weights.

    ``train()``, ``eval()``, ``move_to_ascent()`` and ``move_from_ascent()`` change
    the fp32 masters and push them to the bit16 weights ``engine.module`` computes
    with (an all-gather under ZeRO-1/2, a local copy plus the persistent-param gather
    under ZeRO-3). ``engine.step()`` is the step; ``step()`` here is an error.
    ``state_dict()``/``load_state_dict()`` are this rank's optimizer state (DeepSpeed's
    ``engine.save_checkpoint``/``load_checkpoint`` already include it).
    """

    def __init__(self, engine: Any, optimizer: AdamWMSAMScheduleFree, driver: DeepSpeedDriver) -> None:
        self.engine = engine
        self.optimizer = optimizer
        self._driver = driver

    # ------------------------------------------------------------------ properties
    @property
    def zero_optimizer(self) -> Any:
        """DeepSpeed's wrapper (``engine.optimizer``)."""
        return self._driver.zero

    @property
    def kind(self) -> str:
        """``"zero12"``, ``"zero3"`` or ``"bf16"`` (DeepSpeed's BF16_Optimizer, ZeRO-1 + fp32 grad accumulation)."""
        return self._driver.kind

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def sam_mode(self) -> str:
        return self.optimizer.sam_mode

    @property
    def skipped_steps(self) -> int:
        return self.optimizer.skipped_steps

    @property
    def train_mode(self) -> bool:
        return all(g["train_mode"] for g in self.optimizer.param_groups)

    def __repr__(self) -> str:
        return f"DeepSpeedMSAMOptimizer({self.kind}, {self.optimizer.__class__.__name__}, sam_mode={self.sam_mode!r})"

    # ------------------------------------------------------------------ modes
    def train(self) -> None:
        """x → y (and the one_pass ascent), on the masters and the bit16 weights."""
        with self._driver.param_groups_filled():
            self.optimizer.train()

    def eval(self) -> None:
        """Remove the ascent, y → x: ``engine.module`` computes with the averaged weights."""
        with self._driver.param_groups_filled():
            self.optimizer.eval()

    def move_to_ascent(self) -> None:
        """two_pass: after ``engine.backward(loss)``, fold that gradient into m, drop it, and move
        the weights to ``y + ρ·m/||m||``. one_pass: the weights already sit at the ascent (no-op)."""
        opt = self.optimizer
        opt._require_train("move_to_ascent()")
        if opt.sam_mode == "one_pass":
            return
        if any(g["at_ascent"] for g in opt.param_groups):
            raise RuntimeError("move_to_ascent() was called twice: after it, run the second backward pass "
                               "(engine.backward(loss)), then call move_from_ascent() and engine.step()")
        self._driver.ascent()

    def move_from_ascent(self) -> None:
        """Remove the ascent: the weights return to y."""
        with self._driver.param_groups_filled():
            self.optimizer.move_from_ascent()

    def step(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("under DeepSpeed the step is engine.step(): it runs this optimizer inside the ZeRO step")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._driver.zero.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """This rank's optimizer state (its partitions' z, v, m and the per-group counters)."""
        with self._driver.param_groups_filled():
            return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load this rank's optimizer state; the masters are not changed (use engine.load_checkpoint
        for a full resume)."""
        with self._driver.param_groups_filled():
            self.optimizer.load_state_dict(state_dict)

    @torch.no_grad()
    def eval_state_dict(self, rank0_only: bool = False) -> Optional[Dict[str, torch.Tensor]]:
        """The eval-mode (x) weights as a consolidated fp32 ``state_dict`` of ``engine.module``,
        on the CPU, for inference. Collective: every rank must call it. The model is switched
        to eval mode for the gather and back to the mode it was in."""
        from deepspeed.utils import safe_get_full_fp32_param
        was_train = self.train_mode
        if was_train:
            self.eval()
        try:
            module = self.engine.module
            out: Dict[str, torch.Tensor] = {}
            rank0 = not dist.is_initialized() or dist.get_rank() == 0
            for name, p in module.named_parameters():
                full = safe_get_full_fp32_param(p) if p.requires_grad else None
                if full is None:  # a frozen param: DeepSpeed keeps no master
                    full = _gathered(p)
                if rank0 or not rank0_only:
                    out[name] = full.detach().float().cpu().clone()
            for name, b in module.named_buffers():
                if rank0 or not rank0_only:
                    out[name] = b.detach().cpu().clone()
        finally:
            if was_train:
                self.train()
        return out if (rank0 or not rank0_only) else None

    def save_eval_weights(self, path: Union[str, os.PathLike]) -> None:
        """Write :meth:`eval_state_dict` with ``torch.save`` on rank 0 (collective)."""
        sd = self.eval_state_dict(rank0_only=True)
        if sd is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            torch.save(sd, str(path))


def _gathered(p: torch.Tensor) -> torch.Tensor:
    if hasattr(p, "ds_id"):  # ZeRO-3 partitioned
        import deepspeed
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().clone()
    return p.detach()


# ---------------------------------------------------------------------- demo / launcher smoke run
def main(argv: Optional[list] = None) -> int:
    """``python -m sharded_msam_sf.deepspeed --config configs/deepspeed/zero2-cpu.json``: a tiny regression
    model trained with the config's optimizer section on synthetic data — the program the
    launch scripts (launch/deepspeed.sh, launch/mpirun.sh, torchrun) start to check a setup."""
    import argparse
    import time
    parser = argparse.ArgumentParser(prog="python -m sharded_msam_sf.deepspeed", description=main.__doc__)
    parser.add_argument("--config", required=True, help="DeepSpeed JSON config naming AdamWMSAMScheduleFree")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--dist-backend", default=None, help="gloo, nccl, mpi, ccl (default: DeepSpeed's choice)")
    parser.add_argument("--save-dir", default=None, help="engine.save_checkpoint here at the end")
    parser.add_argument("--export", default=None, help="write the eval-mode (x) weights as an fp32 state dict here")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, args.width), torch.nn.GELU(), torch.nn.Linear(args.width, 1))
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    engine, optimizer, _, _ = initialize(model=model, config=args.config, dist_backend=args.dist_backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = next(engine.module.parameters()).device
    dtype = next(engine.module.parameters()).dtype
    micro = engine.train_micro_batch_size_per_gpu()
    gen = torch.Generator().manual_seed(1234 + rank)
    w_true = torch.randn(16, 1, generator=torch.Generator().manual_seed(7))

    def batch():
        x = torch.randn(micro, 16, generator=gen)
        return x.to(device, dtype), (x @ w_true).to(device)

    optimizer.train()
    t0 = time.time()
    for step in range(args.steps):
        for _ in range(engine.gradient_accumulation_steps()):
            x, y = batch()
            loss = torch.nn.functional.mse_loss(engine(x).float(), y)
            engine.backward(loss)
            if optimizer.sam_mode == "two_pass":
                optimizer.move_to_ascent()
                engine.backward(torch.nn.functional.mse_loss(engine(x).float(), y))
                optimizer.move_from_ascent()
            engine.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    optimizer.eval()
    with torch.no_grad():
        x, y = batch()
        eval_loss = torch.nn.functional.mse_loss(engine(x).float(), y).item()
    if args.export:
        optimizer.save_eval_weights(args.export)
    optimizer.train()
    if args.save_dir:
        engine.save_checkpoint(args.save_dir)
    if rank == 0:
        print(f"done: world={world} {optimizer!r} eval_loss={eval_loss:.4f} "
              f"({time.time() - t0:.1f} s)", flush=True)
    engine.destroy()
    del engine, optimizer, model
    from .teardown import close_process_group
    close_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
