"""One wrapper per engine with the same small interface for the training loop.

`build_engine(cfg, dist_env)` wraps the GPT in DDP, FSDP2 (`fully_shard` per block
and at the root; with parallel.tp > 1 tensor parallel first, on the dp × tp mesh of
`dist_env.mesh`: job/tensor_parallel.py), FSDP1 (one unit per block, `use_orig_params=True`) or a DeepSpeed
ZeRO-1/2/3 engine, and builds `AdamWMSAMScheduleFree` on it. The loop then only calls:

    loss = engine.forward_backward(x, y, last_micro)   # one micro-batch
    engine.step()                                      # clip, optimizer step, zero grads
    engine.optimizer.train() / .eval() / .move_to_ascent() / .move_from_ascent()
    engine.save(dir) / engine.load(dir) / engine.full_state_dict()

Checkpoints: DDP saves one file from rank 0 (read back with torch.load(weights_only=True));
FSDP1/FSDP2 use torch.distributed.checkpoint (sharded, every rank writes its part);
DeepSpeed uses engine.save_checkpoint/load_checkpoint.
"""
from __future__ import annotations

import abc
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..launch_env import export as export_launch_env
from .config import JobConfig
from .model import GPT, Block, GPTConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    tp: int = 1
    """tensor-parallel ranks per model replica (parallel.tp); rank = dp_rank * tp + tp_rank"""
    mesh: object = None
    """the dp × tp DeviceMesh when tp > 1, the pp × dp one when pp > 1, else None"""
    pp: int = 1
    """pipeline stages per model replica (parallel.pp; not with tp > 1); rank = pp_rank * dp_size + dp_rank"""

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: its slice of the global batch (shared by its tp ranks or stages)."""
        return self.rank % self.dp_size if self.pp > 1 else self.rank // self.tp

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp_size if self.pp > 1 else 0

    @property
    def reports_loss(self) -> bool:
        """Whether this rank's losses enter the logged means: one rank per data-parallel replica (tp rank 0,
        the last pipeline stage, which alone computes the loss)."""
        return self.tp_rank == 0 and self.pp_rank == self.pp - 1


def build_model(cfg: JobConfig, device: torch.device | str = "cpu") -> GPT:
    """The GPT of the config, initialised from train.seed (the same weights on every rank and run)."""
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        return GPT(GPTConfig(**vars(cfg.model)), activation_checkpointing=cfg.engine.activation_checkpointing)


def _optimizer(params, cfg: JobConfig, **extra):
    from sharded_msam_sf.optimizer import AdamWMSAMScheduleFree
    return AdamWMSAMScheduleFree(params, **cfg.optimizer_kwargs, **extra)


class _MicroBatches:
    """A step's micro-batches one at a time (every engine but the pipeline's, which runs them in one schedule)."""

    def backward_micro_batches(self, micro: list) -> list:
        """Forward and backward of every (inputs, targets) of the step, gradients accumulated (the mean over
        them); the micro-batches' losses."""
        return [self.forward_backward(x, y, i == len(micro) - 1) for i, (x, y) in enumerate(micro)]

    def forward_micro_batches(self, micro: list) -> list:
        """The loss of every (inputs, targets), forward only."""
        return [self.forward(x, y) for x, y in micro]


def _dcp_options():
    """Flattened optimizer state: FSDP1's sharded optimizer state dict has no entry on a rank for
    a param whose first dim is smaller than the world size, which nested keys then miss on load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(flatten_optimizer_state_dict=True)


class _TorchEngine(_MicroBatches, abc.ABC):
    """DDP / FSDP1 / FSDP2: a torch module, our optimizer, manual accumulation and clipping."""

    def __init__(self, cfg: JobConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.module = build_model(cfg, env.device)
        self.n_params = self.module.num_params()
        self.model = self.wrap(self.module)
        self.optimizer = _optimizer(self.model.parameters(), cfg, **self.optimizer_extra())
        dtype = _DTYPES[cfg.engine.dtype]
        self.autocast = (torch.autocast(env.device.type, dtype=dtype) if self.use_autocast and dtype != torch.float32
                         else contextlib.nullcontext())
        self.accum = cfg.grad_accum

    use_autocast = True

    def optimizer_extra(self) -> dict:
        """Keyword arguments the engine adds to the optimizer's (pipeline_group= of a pipeline stage)."""
        return {}

    @abc.abstractmethod
    def wrap(self, module: nn.Module) -> nn.Module:
        """The engine's wrapper around the built model."""

    def sync_context(self, last_micro: bool):
        return contextlib.nullcontext()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return self.model(x, y)

    def forward_backward(self, x, y, last_micro: bool) -> torch.Tensor:
        with self.sync_context(last_micro):
            loss = self.forward(x, y)
            (loss / self.accum).backward()
        return loss.detach()

    def clip(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)

    def step(self) -> None:
        if self.cfg.train.grad_clip > 0:
            self.clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_train(self, train: bool) -> None:
        self.model.train(train)

    # -- checkpoints: torch.distributed.checkpoint (overridden by DDP)
    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=_dcp_options())
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path))

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=_dcp_options())
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=_dcp_options())

    def full_state_dict(self) -> dict | None:
        """The full, unsharded model weights on rank 0 (None elsewhere); collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        # cpu_offload gathers to rank 0's host memory (a 1.3B model does not fit twice on a GPU); on CPU
        # it is pointless, and FSDP1's offload path segfaults on CPU tensors (torch 2.13)
        offload = self.env.device.type == "cuda"
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
        return sd if self.env.rank == 0 else None

    def close(self) -> None:
        """Release engine resources; the torch engines hold none beyond the process group."""


class DDPEngine(_TorchEngine):
    def wrap(self, module):
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DDP(module, device_ids=ids)

    def sync_context(self, last_micro):
        return contextlib.nullcontext() if last_micro else self.model.no_sync()

    def save(self, path: Path) -> None:
        if self.env.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                       path / "state.pt")

    def load(self, path: Path) -> None:
        from .checkpoint import load_torch_file
        state = load_torch_file(path / "state.pt", map_location=self.env.device)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_state_dict(self):
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()} if self.env.rank == 0 else None


class FSDP2Engine(_TorchEngine):
    use_autocast = False  # FSDP2 casts with its MixedPrecisionPolicy

    def wrap(self, module):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        if self.env.mesh is not None:  # tensor parallel over mesh["tp"], then FSDP over mesh["dp"]
            from .tensor_parallel import parallelize_gpt
            parallelize_gpt(module, self.env.mesh["tp"])
            mesh = self.env.mesh["dp"]
        else:
            mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        dtype = _DTYPES[self.cfg.engine.dtype]
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in module.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        return fully_shard(module, mesh=mesh, mp_policy=mp)

    def sync_context(self, last_micro):
        self.model.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()

    def clip(self):
        if self.env.mesh is None:
            return super().clip()
        from .tensor_parallel import clip_grad_norm_  # params on two meshes: torch's cannot stack their norms
        clip_grad_norm_(self.model.parameters(), self.optimizer.backend, self.cfg.train.grad_clip)


class FSDP2PipelineEngine(FSDP2Engine):
    """parallel.pp > 1: this rank's stage of the GPT (sharded_msam_sf.job.pipeline_parallel), fully_shard over
    the mesh's dp dim, one schedule call per gradient evaluation, one optimizer per stage with
    pipeline_group= the pp group (its norm and NaN flag span all stages)."""

    def __init__(self, cfg: JobConfig, env: DistEnv):
        super().__init__(cfg, env)
        self.module = self.model  # the stage: the other stages' modules are dropped

    def wrap(self, module):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.pipelining import PipelineStage

        from .pipeline_parallel import GPTStage, make_schedule
        env = self.env
        self.names = list(module.state_dict())  # the full model's order, for the export
        stage = GPTStage(module, env.pp_rank, env.pp)
        mesh = env.mesh["dp"]
        mp = MixedPrecisionPolicy(param_dtype=_DTYPES[self.cfg.engine.dtype], reduce_dtype=torch.float32)
        for block in stage.blocks.values():
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(stage, mesh=mesh, mp_policy=mp)
        self.pp_group = env.mesh["pp"].get_group()
        self.stage = PipelineStage(stage, env.pp_rank, env.pp, env.device, group=self.pp_group)
        self.schedule = make_schedule(self.stage, self.cfg.parallel.schedule, self.cfg.grad_accum)
        return stage

    def optimizer_extra(self) -> dict:
        return {"pipeline_group": self.pp_group}

    def _run_schedule(self, micro: list, run) -> list:
        """``run(*inputs, target=, losses=)`` (the schedule's step or eval) on the concatenated micro-batches
        (the schedule splits them back); the micro-batches' losses on the last stage, zeros elsewhere."""
        x, y = torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro])
        losses: list = []
        if self.stage.is_first:
            run(x)
        elif self.stage.is_last:
            run(target=y, losses=losses)
        else:
            run()
        if not self.stage.is_last:
            return [torch.zeros((), device=self.env.device) for _ in micro]
        return [loss.detach().float() for loss in losses]

    def backward_micro_batches(self, micro: list) -> list:
        if len(micro) != self.cfg.grad_accum:
            raise ValueError(f"the schedule runs {self.cfg.grad_accum} micro-batches per step, got {len(micro)}")
        return self._run_schedule(micro, self.schedule.step)

    def forward_micro_batches(self, micro: list) -> list:
        """Forward only, ``grad_accum`` micro-batches per schedule call; the last call is padded with
        repeats of the last micro-batch, whose losses are dropped."""
        n, out = self.cfg.grad_accum, []
        for i in range(0, len(micro), n):
            chunk = micro[i: i + n]
            out += self._run_schedule(chunk + [chunk[-1]] * (n - len(chunk)), self.schedule.eval)[:len(chunk)]
        return out

    def full_state_dict(self) -> dict | None:
        """Every stage's full weights (gathered over dp), sent to rank 0 and merged there in the full model's
        key order; None elsewhere. Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        part = {k: v.detach().cpu() for k, v in sd.items()} if self.env.dp_rank == 0 else None
        parts = [None] * self.env.world_size if self.env.rank == 0 else None
        dist.gather_object(part, parts, dst=0)
        if self.env.rank != 0:
            return None
        merged = {k: v for p in parts if p for k, v in p.items()}
        return {k: merged[k] for k in self.names if k in merged}


class FSDP1Engine(_TorchEngine):
    use_autocast = False

    def wrap(self, module):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import MixedPrecision
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        dtype = _DTYPES[self.cfg.engine.dtype]
        mp = (MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32, buffer_dtype=dtype)
              if dtype != torch.float32 else None)
        return FSDP(module, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=self.env.device,
                    use_orig_params=True, mixed_precision=mp)

    def sync_context(self, last_micro):
        return contextlib.nullcontext() if last_micro else self.model.no_sync()

    def clip(self):
        self.model.clip_grad_norm_(self.cfg.train.grad_clip)


def deepspeed_config(cfg: JobConfig) -> dict:
    """The DeepSpeed JSON config this job runs with (engine.deepspeed is merged on top)."""
    t = cfg.train
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": cfg.engine.dtype == "bf16"},
        "fp16": {"enabled": cfg.engine.dtype == "fp16"},
        "optimizer": cfg.optimizer,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v
    merge(ds, cfg.engine.deepspeed)
    return ds


class DeepSpeedEngine(_MicroBatches):
    def __init__(self, cfg: JobConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.module = build_model(cfg, env.device)
        self.n_params = self.module.num_params()
        self.ds_config = deepspeed_config(cfg)
        from sharded_msam_sf.deepspeed import initialize
        self.model, self.optimizer, _, _ = initialize(model=self.module, config=self.ds_config)

    def forward(self, x, y):
        return self.model(x, y)

    def forward_backward(self, x, y, last_micro: bool) -> torch.Tensor:
        loss = self.model(x, y)
        self.model.backward(loss)
        if not last_micro:
            self.model.step()  # DeepSpeed counts micro-steps; it only updates at the boundary
        return loss.detach().float()

    def step(self) -> None:
        self.model.step()

    def set_train(self, train: bool) -> None:
        self.model.train(train)

    def save(self, path: Path) -> None:
        self.model.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)
        if self.env.rank == 0:  # DeepSpeed's zero_to_fp32.py would give the training point: say so in the dir
            from ..weights_io import write_deepspeed_readme
            write_deepspeed_readme(path)

    def load(self, path: Path) -> None:
        load_path, _ = self.model.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")

    def load_universal(self, path: Path) -> None:
        """A universal checkpoint of another world size or ZeRO stage (sharded_msam_sf.job.universal)."""
        from ..deepspeed.universal import load_universal
        from ..deepspeed.universal import UniversalCheckpointError
        from .checkpoint import CheckpointError
        try:
            load_universal(self.model, path)
        except UniversalCheckpointError as e:
            raise CheckpointError(str(e)) from e

    def full_state_dict(self):
        """The fp32 masters (x in eval mode), not rounded to a bf16 model's dtype: see
        sharded_msam_sf.deepspeed.weights.full_fp32_state_dict."""
        return self.optimizer.eval_state_dict(rank0_only=True)

    def close(self) -> None:
        self.model.destroy()


ENGINES = {"ddp": DDPEngine, "fsdp2": FSDP2Engine, "fsdp1": FSDP1Engine, "deepspeed": DeepSpeedEngine}


def build_engine(cfg: JobConfig, env: DistEnv):
    if cfg.parallel.pp > 1:  # the config allows it with fsdp2 only
        return FSDP2PipelineEngine(cfg, env)
    return ENGINES[cfg.engine.name](cfg, env)


# ---------------------------------------------------------------- process group
def _restart_safe_store(world: int):
    """Under torchrun, the workers of every restart share the agent's TCPStore (torch 2.13 keeps one
    server across rendezvous rounds), so a restarted group would read the dead group's gloo/nccl
    addresses and fail with 'connection refused'. A per-attempt key prefix isolates the rounds."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # init_process_group's env:// rendezvous
    from datetime import timedelta
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"/sharded_msam_sf/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


class LaunchMismatch(RuntimeError):
    """The launcher's environment and the process group disagree on the world size or rank."""


def init_distributed(cfg: JobConfig) -> DistEnv:
    """The process group (gloo/nccl) for the launcher's ranks. The world size and rank are the process
    group's once it exists; a launcher environment that disagrees with it (a stray ``WORLD_SIZE``, the
    config validated for another world size) is refused: gradients would be averaged over the wrong count."""
    stray = os.environ.get("WORLD_SIZE")  # export_launch_env overwrites it with the launcher's world size
    launch = export_launch_env()  # torchrun, deepspeed, mpirun, srun or plain python
    rank, world, local = launch.rank, launch.world_size, launch.local_rank
    if stray is not None and stray.strip() != str(world):
        raise LaunchMismatch(f"WORLD_SIZE={stray} is set, but the launcher ({launch.launcher}) started {world} "
                             "rank(s): a stray variable (an sbatch script without srun, a copied environment). "
                             "Unset WORLD_SIZE, or start the ranks with torchrun / srun / mpirun")
    if cfg.world_size != world:
        raise LaunchMismatch(f"the config was validated for {cfg.world_size} rank(s), and the launcher "
                             f"({launch.launcher}) started {world}: global batch and accumulation would be wrong")
    use_cuda = cfg.engine.device == "cuda" or (cfg.engine.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("engine.device is 'cuda' but CUDA is not available")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        if cfg.engine.name == "deepspeed":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = cfg.engine.backend if cfg.engine.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, store=_restart_safe_store(world),
                                device_id=device if use_cuda else None)
    if (dist.get_world_size(), dist.get_rank()) != (world, rank):
        raise LaunchMismatch(f"the process group has {dist.get_world_size()} rank(s) (this is rank {dist.get_rank()}), "
                             f"the launcher ({launch.launcher}) says {world} (rank {rank}): refusing to train with "
                             "gradients averaged over the wrong number of ranks")
    if cfg.engine.name == "deepspeed":
        import deepspeed
        deepspeed.init_distributed(dist_backend=backend)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    mesh = None
    if tp > 1:
        from .tensor_parallel import make_mesh
        mesh = make_mesh(device.type, world, tp)
    elif pp > 1:
        from .pipeline_parallel import make_mesh
        mesh = make_mesh(device.type, world, pp)
    return DistEnv(rank, local, world, device, backend, tp, mesh, pp)
