"""The main job's JSON schema: typed dataclasses, validated before any process group starts.

A config file is a JSON object with the sections below; every key is optional and
unknown keys are errors. `--override section.key=value` (value parsed as JSON, or
taken as a string) changes one key. The optimizer section has the DeepSpeed-config
schema of `sharded_msam_sf.config` ({"type": "AdamWMSAMScheduleFree", "params": {...}}).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ENGINES = ("ddp", "fsdp2", "fsdp1", "deepspeed")


from sharded_msam_sf.config import ConfigError as _OptimizerConfigError

from .model import GPTConfig as ModelConfig  # the "model" section is the GPT's own config


class ConfigError(_OptimizerConfigError):
    """A bad job config (a ValueError); the message names the key."""


@dataclass
class EngineConfig:
    name: str = "ddp"  # ddp | fsdp2 | fsdp1 | deepspeed
    zero_stage: int = 2  # deepspeed only: 1, 2 or 3
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (fp16: deepspeed only)
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # auto (nccl on cuda, gloo on cpu) | gloo | nccl | mpi
    activation_checkpointing: bool = False
    deepspeed: dict = field(default_factory=dict)  # extra keys merged into the DeepSpeed config


@dataclass
class DataConfig:
    path: Optional[str] = None  # None: the embedded corpus; else a token file or a dir with train.bin/val.bin
    val_path: Optional[str] = None  # a separate validation token file
    dtype: str = "uint16"  # uint16 | uint32 (token files only)
    val_fraction: float = 0.1  # held-out share when there is no separate validation file
    corpus_max_bytes: int = 4_000_000  # embedded corpus: bytes of stdlib source read at most


@dataclass
class TrainConfig:
    global_batch_size: int = 16  # sequences per optimizer step, independent of the world size
    micro_batch_size: int = 8  # sequences per rank per forward
    max_steps: int = 200
    grad_clip: float = 1.0  # 0 disables
    seed: int = 1234  # 0 .. 2**32 - 1
    max_skipped_steps: int = 100  # consecutive non-finite (skipped) steps that stop the job; 0: no limit


@dataclass
class EvalConfig:
    interval: int = 50  # steps; 0: only at the end
    batches: int = 8  # validation micro-batches in total (a fixed set, shared out over the ranks)


@dataclass
class CheckpointConfig:
    interval: int = 100  # steps; 0: only at the end and on SIGTERM/SIGINT
    keep: int = 2  # newest checkpoints kept
    resume: str = "auto"  # auto (resume if out_dir has one) | never | must | a checkpoint path
    export: bool = True  # write eval-mode (x) weights to out_dir/export/ (model.safetensors) at the end


@dataclass
class LogConfig:
    out_dir: str = "runs/default"
    interval: int = 10  # steps between progress lines / metrics records
    progress: str = "auto"  # auto (a bar on a TTY, lines otherwise) | bar | lines | none
    plot: bool = True


@dataclass
class JobConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: dict = field(default_factory=lambda: {"type": "AdamWMSAMScheduleFree", "params": {}})
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    # derived, filled by validate()
    world_size: int = field(default=1, repr=False)
    grad_accum: int = field(default=1, repr=False)
    optimizer_kwargs: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("world_size", "grad_accum", "optimizer_kwargs"):
            d.pop(k)
        return d


_CHOICES = {
    "engine.name": ENGINES,
    "engine.zero_stage": (1, 2, 3),
    "engine.dtype": ("fp32", "bf16", "fp16"),
    "engine.device": ("auto", "cpu", "cuda"),
    "engine.backend": ("auto", "gloo", "nccl", "mpi"),
    "data.dtype": ("uint16", "uint32"),
    "log.progress": ("auto", "bar", "lines", "none"),
}
_POSITIVE = {"model.vocab_size", "model.block_size", "model.n_layer", "model.n_head", "model.n_embd",
             "data.corpus_max_bytes", "train.global_batch_size", "train.micro_batch_size",
             "train.max_steps", "eval.batches", "checkpoint.keep", "log.interval"}
_NON_NEGATIVE = {"train.grad_clip", "eval.interval", "checkpoint.interval", "train.max_skipped_steps"}
MAX_SEED = 2 ** 32 - 1
# keys of the generated DeepSpeed config that the job owns: engine.deepspeed may not change them
_DEEPSPEED_OWNED = {
    "optimizer": "the 'optimizer' section",
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size x world size)",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "engine.zero_stage",
    "bf16.enabled": "engine.dtype",
    "fp16.enabled": "engine.dtype",
}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(key: str, value: Any, tp) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }[tp]
    if not ok:
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return float(value) if tp is float else value


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix}' must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.repr}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known keys in "
                          f"'{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, tp)
    return cls(**kwargs)


def _set_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--override expects key=value, got {item!r}")
    key, text = item.split("=", 1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--override {key}: '{part}' is not a section")
    node[parts[-1]] = value


def env_world_size() -> int:
    """The world size the launcher announced (torchrun/deepspeed, MPI, SLURM), before any init."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), world_size: int | None = None,
                data_path: str | None = None) -> JobConfig:
    """Read, override and validate a job config; raises ConfigError naming the bad key."""
    from sharded_msam_sf.jsonfile import read_json_object
    raw: dict = read_json_object(path, ConfigError) if path is not None else {}
    for item in overrides:
        _set_override(raw, item)
    if data_path is not None:
        raw.setdefault("data", {})["path"] = data_path
    if isinstance(raw.get("optimizer"), dict):  # the job has one optimizer: its type may be left out
        raw["optimizer"].setdefault("type", "AdamWMSAMScheduleFree")
    cfg = _build(JobConfig, raw, "")
    validate(cfg, env_world_size() if world_size is None else world_size)
    return cfg


def _check_deepspeed_overrides(cfg: JobConfig) -> None:
    """engine.deepspeed may add DeepSpeed keys (offload, buckets, ...) but not replace what the job sets:
    another optimizer there would train with it while the job drives AdamWMSAMScheduleFree's modes."""
    ds = cfg.engine.deepspeed
    for key, owner in _DEEPSPEED_OWNED.items():
        node, parts = ds, key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and parts[-1] in node:
            raise ConfigError(f"config key 'engine.deepspeed.{key}' is set by the job from {owner}; "
                              f"remove it from engine.deepspeed (got {node[parts[-1]]!r})")


def validate(cfg: JobConfig, world_size: int) -> None:
    flat = {f"{s}.{k}": v for s in ("engine", "model", "data", "train", "eval", "checkpoint", "log")
            for k, v in dataclasses.asdict(getattr(cfg, s)).items()}
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {flat[key]!r}")
    for key in _POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {flat[key]!r}")
    for key in _NON_NEGATIVE:
        if not flat[key] >= 0:  # also NaN
            raise ConfigError(f"config key '{key}' must be >= 0, got {flat[key]!r}")
    if not math.isfinite(cfg.train.grad_clip):
        raise ConfigError(f"config key 'train.grad_clip' must be a finite number >= 0 (0 disables clipping), "
                          f"got {cfg.train.grad_clip!r}")
    if not 0 <= cfg.train.seed <= MAX_SEED:
        raise ConfigError(f"config key 'train.seed' must be in [0, 2**32 - 1] (torch and numpy seeds), "
                          f"got {cfg.train.seed}")
    out = Path(cfg.log.out_dir)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"config key 'log.out_dir': {p} is a file, not a directory")
        if p.exists():
            break
    _check_deepspeed_overrides(cfg)
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"config key 'model.dropout' must be in [0, 1), got {cfg.model.dropout}")
    if cfg.model.n_embd % cfg.model.n_head:
        raise ConfigError(f"config key 'model.n_embd' ({cfg.model.n_embd}) must be divisible by "
                          f"'model.n_head' ({cfg.model.n_head})")
    if cfg.engine.dtype == "fp16" and cfg.engine.name != "deepspeed":
        raise ConfigError("config key 'engine.dtype': fp16 needs a loss scaler; use bf16, or engine.name=deepspeed")
    if cfg.data.path is None:
        if cfg.model.vocab_size < 256:
            raise ConfigError(f"config key 'model.vocab_size' must be >= 256 for the embedded byte-level "
                              f"corpus, got {cfg.model.vocab_size}")
    else:
        for key in ("data.path", "data.val_path"):
            p = flat[key]
            if p is not None and not Path(p).exists():
                raise ConfigError(f"config key '{key}': data file not found: {p}")
        if Path(cfg.data.path).is_dir() and not (Path(cfg.data.path) / "train.bin").is_file():
            raise ConfigError(f"config key 'data.path': directory {cfg.data.path} has no train.bin")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"config key 'data.val_fraction' must be in (0, 1), got {cfg.data.val_fraction}")
    r = cfg.checkpoint.resume
    if r not in ("auto", "never", "must") and not Path(r).exists():
        raise ConfigError(f"config key 'checkpoint.resume': checkpoint not found: {r}")

    # the batch split: global = micro * world * accumulation
    t = cfg.train
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"config key 'train.global_batch_size' ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size}) x world size ({world_size}) = {per_step}")
    cfg.world_size = world_size
    cfg.grad_accum = t.global_batch_size // per_step

    # the optimizer section: the DeepSpeed-config schema, validated by sharded_msam_sf.config
    from sharded_msam_sf.config import optimizer_kwargs_from_config
    try:
        cfg.optimizer_kwargs = optimizer_kwargs_from_config(cfg.optimizer)
    except ValueError as e:
        msg = str(e)
        raise ConfigError(msg if "optimizer" in msg else f"config section 'optimizer': {msg}") from None
    if (cfg.engine.name == "deepspeed" and cfg.grad_accum > 1
            and cfg.optimizer_kwargs.get("sam_mode") == "two_pass"):
        raise ConfigError(
            "config key 'optimizer.params.sam_mode': two_pass under DeepSpeed needs one micro-batch per "
            f"rank per step (gradient accumulation is {cfg.grad_accum}); raise train.micro_batch_size "
            "to global_batch_size / world size, or use one_pass")
