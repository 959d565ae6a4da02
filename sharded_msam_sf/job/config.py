"""The main job's JSON schema: pydantic models, validated before any process group starts.

A config file is a JSON object with the sections below; every key is optional and
unknown keys are errors. `--override section.key=value` (value parsed as JSON, or
taken as a string) changes one key. The optimizer section has the DeepSpeed-config
schema of `sharded_msam_sf.config` ({"type": "AdamWMSAMScheduleFree", "params": {...}}).
Types are strict (no "10" for 10, no true for 1; an integer is accepted for a float).
`python -m sharded_msam_sf.train --print-schema` writes the JSON Schema (docs/job-config.schema.json).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Optional

import pydantic
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic.functional_validators import BeforeValidator
from pydantic.json_schema import WithJsonSchema
from typing_extensions import Annotated

from sharded_msam_sf.config import ConfigError as _OptimizerConfigError
from sharded_msam_sf.config import OptimizerSection, optimizer_kwargs_from_config

from .model import GPTConfig

ENGINES = ("ddp", "fsdp2", "fsdp1", "deepspeed")
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


class ConfigError(_OptimizerConfigError):
    """A bad job config (a ValueError); the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


class EngineConfig(_Section):
    name: Literal[ENGINES] = "ddp"
    """the data-parallel engine"""
    zero_stage: int = Field(2, ge=1, le=3)
    """deepspeed only: ZeRO stage 1, 2 or 3"""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """parameter/compute dtype (fp16: deepspeed only, it needs a loss scaler)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["auto", "gloo", "nccl", "mpi"] = "auto"
    """auto: nccl on cuda, gloo on cpu"""
    activation_checkpointing: bool = False
    deepspeed: dict = Field(default_factory=dict)
    """extra keys merged into the generated DeepSpeed config (not those the job sets: optimizer, batch sizes,
    gradient_clipping, zero_optimization.stage, bf16/fp16.enabled)"""

    @field_validator("deepspeed")
    @classmethod
    def _not_job_owned(cls, ds: dict) -> dict:
        """Another optimizer there would train with it while the job drives AdamWMSAMScheduleFree's modes."""
        for key, owner in _DEEPSPEED_OWNED.items():
            node, parts = ds, key.split(".")
            for part in parts[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and parts[-1] in node:
                raise ConfigError(f"config key 'engine.deepspeed.{key}' is set by the job from {owner}; "
                                  f"remove it from engine.deepspeed (got {node[parts[-1]]!r})")
        return ds

    @model_validator(mode="after")
    def _fp16(self) -> "EngineConfig":
        if self.dtype == "fp16" and self.name != "deepspeed":
            raise ConfigError("config key 'engine.dtype': fp16 needs a loss scaler; use bf16, or engine.name=deepspeed")
        return self


_G = GPTConfig()


class ModelConfig(_Section):
    """The GPT's own config (sharded_msam_sf.job.model.GPTConfig): vars(cfg.model) builds it."""
    vocab_size: int = Field(_G.vocab_size, gt=0)
    """>= 256 with the embedded byte-level corpus"""
    block_size: int = Field(_G.block_size, gt=0)
    """sequence length"""
    n_layer: int = Field(_G.n_layer, gt=0)
    n_head: int = Field(_G.n_head, gt=0)
    n_embd: int = Field(_G.n_embd, gt=0)
    """a multiple of n_head"""
    dropout: float = Field(_G.dropout, ge=0, lt=1)
    bias: bool = _G.bias
    tie_embeddings: bool = _G.tie_embeddings
    """the output head shares the token embedding's weight; false (an own head) is required by parallel.pp > 1"""

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.n_embd % self.n_head:
            raise ConfigError(f"config key 'model.n_embd' ({self.n_embd}) must be divisible by "
                              f"'model.n_head' ({self.n_head})")
        return self


class DataConfig(_Section):
    path: Optional[str] = None
    """null: the embedded corpus (stdlib source, bytes); else a token file or a dir with train.bin/val.bin"""
    val_path: Optional[str] = None
    """a separate validation token file"""
    dtype: Literal["uint16", "uint32"] = "uint16"
    """token files only"""
    val_fraction: float = Field(0.1, gt=0, lt=1)
    """held-out share when there is no separate validation file"""
    corpus_max_bytes: int = Field(4_000_000, gt=0)
    """embedded corpus: bytes of stdlib source read at most"""

    @field_validator("path", "val_path")
    @classmethod
    def _exists(cls, p: Optional[str], info: pydantic.ValidationInfo) -> Optional[str]:
        if p is not None and not Path(p).exists():
            raise ConfigError(f"config key 'data.{info.field_name}': data file not found: {p}")
        if p is not None and info.field_name == "path" and Path(p).is_dir() and not (Path(p) / "train.bin").is_file():
            raise ConfigError(f"config key 'data.path': directory {p} has no train.bin")
        return p


class ParallelConfig(_Section):
    """Model parallelism inside the data-parallel engine (the data-parallel size is world size / tp)."""
    tp: int = Field(1, ge=1)
    """tensor-parallel ranks per model replica (engine fsdp2 only): attention heads and MLP columns split over
    them (sharded_msam_sf.job.tensor_parallel); must divide the world size and model.n_head"""
    pp: int = Field(1, ge=1)
    """pipeline stages (engine fsdp2 only; not with tp > 1): the GPT's blocks split evenly over them
    (sharded_msam_sf.job.pipeline_parallel); must divide the world size and model.n_layer, and needs
    model.tie_embeddings false"""
    schedule: Literal["gpipe", "1f1b"] = "gpipe"
    """pipeline schedule (pp > 1): all forwards then all backwards (gpipe), or one forward one backward
    (1f1b, needs at least pp micro-batches per step)"""


class TrainConfig(_Section):
    global_batch_size: int = Field(16, gt=0)
    """sequences per optimizer step, independent of the world size"""
    micro_batch_size: int = Field(8, gt=0)
    """sequences per data-parallel rank per forward; global = micro x (world size / (parallel.tp x parallel.pp))
    x accumulation steps"""
    max_steps: int = Field(200, gt=0)
    grad_clip: float = 1.0
    """gradient-norm clipping, a finite number >= 0; 0 disables"""
    seed: int = 1234
    """0 .. 2**32 - 1"""
    max_skipped_steps: int = Field(100, ge=0)
    """consecutive non-finite (skipped) steps that stop the job (exit 3); 0: no limit"""

    @field_validator("grad_clip")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"config key 'train.grad_clip' must be a finite number >= 0 (0 disables clipping), "
                              f"got {v!r}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not 0 <= v <= MAX_SEED:
            raise ConfigError(f"config key 'train.seed' must be in [0, 2**32 - 1] (torch and numpy seeds), got {v}")
        return v


class EvalConfig(_Section):
    interval: int = Field(50, ge=0)
    """steps; 0: only at the end"""
    batches: int = Field(8, gt=0)
    """validation micro-batches in total (a fixed set, shared out over the ranks)"""
    recalibrate_bn: int = Field(0, ge=0)
    """training micro-batches per rank on which BatchNorm running statistics are re-estimated at x before every
    evaluation and the export (sharded_msam_sf.bn.recalibrate; the micro-batches of the latest steps); 0: off.
    Needs a model with BatchNorm (the job's GPT has none) and parallel.tp = parallel.pp = 1"""


class CheckpointConfig(_Section):
    interval: int = Field(100, ge=0)
    """steps; 0: only at the end and on SIGTERM/SIGINT"""
    keep: int = Field(2, gt=0)
    """newest checkpoints kept (plus the newest healthy one)"""
    resume: str = "auto"
    """auto (resume if out_dir has one) | never | must | a checkpoint path"""
    export: bool = True
    """write eval-mode (x) weights to out_dir/export at the end"""
    convert: Literal["auto", "never"] = "auto"
    """deepspeed: a checkpoint written at another world size or ZeRO stage is converted into DeepSpeed's
    universal format with our state (python -m sharded_msam_sf.checkpoint to-universal) under
    out_dir/universal/ and resumed from there (auto), or refused (never)"""
    adopt_unsealed: bool = False
    """checkpoints without manifest.json (written by an earlier release) are refused, naming `python -m
    sharded_msam_sf.checkpoint seal DIR`; true: the job seals them itself at start (each must load with the
    safe loaders first) and resumes as usual. They are never overwritten or removed either way"""

    @field_validator("resume")
    @classmethod
    def _resume(cls, r: str) -> str:
        if r not in ("auto", "never", "must") and not Path(r).exists():
            raise ConfigError(f"config key 'checkpoint.resume': checkpoint not found: {r}")
        return r


def _tensorboard_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("tensorboard") is not None


class LogConfig(_Section):
    out_dir: str = "runs/default"
    interval: int = Field(10, gt=0)
    """steps between progress lines / metrics records"""
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    """auto: a tqdm bar on a TTY, lines otherwise (rank 0, stderr)"""
    plot: bool = True
    """loss.png at the end (needs matplotlib)"""
    tensorboard: Optional[bool] = Field(None, validate_default=True)
    """TensorBoard event files in out_dir/tensorboard; null: on when the tensorboard package is installed"""

    @field_validator("out_dir")
    @classmethod
    def _a_dir(cls, d: str) -> str:
        if not d.strip():
            raise ConfigError("config key 'log.out_dir' is empty (it would mean the working directory); give the "
                              "run directory, e.g. log.out_dir=runs/my_run (log.out_dir=. for the working directory)")
        out = Path(d)
        for p in (out, *out.parents):
            if p.exists() and not p.is_dir():
                raise ConfigError(f"config key 'log.out_dir': {p} is a file, not a directory")
            if p.exists():
                break
        return d

    @field_validator("tensorboard")
    @classmethod
    def _installed(cls, on: Optional[bool]) -> bool:
        if on and not _tensorboard_installed():
            raise ConfigError("config key 'log.tensorboard': true needs the tensorboard package "
                              "(pip install 'sharded_msam_sf[tensorboard]'), or set it to false")
        return _tensorboard_installed() if on is None else on


def _optimizer_section(section: Any) -> Any:
    """The optimizer section stays the dict DeepSpeed reads, checked by sharded_msam_sf.config's model."""
    try:
        optimizer_kwargs_from_config(section)
    except _OptimizerConfigError as e:
        raise ConfigError(str(e)) from None
    return section


class JobConfig(_Section):
    """The main job's config (python -m sharded_msam_sf.train --config FILE)."""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optimizer: Annotated[dict, BeforeValidator(_optimizer_section),
                         WithJsonSchema({"type": "object"})] = Field(
        default_factory=lambda: {"type": "AdamWMSAMScheduleFree", "params": {}})
    """the DeepSpeed-style optimizer section (sharded_msam_sf.config); "type" may be left out"""
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    # derived from the world size (the validation context) by _batch_split
    _world_size: int = PrivateAttr(1)
    _grad_accum: int = PrivateAttr(1)
    _optimizer_kwargs: dict = PrivateAttr(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: world size / (parallel.tp x parallel.pp) (the tp ranks or pipeline stages of one
        replica share its batch)."""
        return self._world_size // (self.parallel.tp * self.parallel.pp)

    @property
    def grad_accum(self) -> int:
        """Micro-batches per data-parallel rank per optimizer step."""
        return self._grad_accum

    @property
    def optimizer_kwargs(self) -> dict:
        """The optimizer's keyword arguments from the optimizer section."""
        return self._optimizer_kwargs

    def to_dict(self) -> dict:
        return self.model_dump()

    @model_validator(mode="after")
    def _batch_split(self, info: pydantic.ValidationInfo) -> "JobConfig":
        if self.data.path is None and self.model.vocab_size < 256:
            raise ConfigError(f"config key 'model.vocab_size' must be >= 256 for the embedded byte-level "
                              f"corpus, got {self.model.vocab_size}")
        world_size = (info.context or {}).get("world_size", 1)
        t = self.train
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        self._check_parallel(world_size)
        tp, pp = self.parallel.tp, self.parallel.pp
        if self.eval.recalibrate_bn and (tp > 1 or pp > 1):
            raise ConfigError(f"config key 'eval.recalibrate_bn' needs parallel.tp = parallel.pp = 1 (got tp {tp}, "
                              f"pp {pp}): the statistics are combined over all ranks as data-parallel replicas")
        per_step = t.micro_batch_size * (world_size // (tp * pp))  # global = micro * dp * accumulation
        if t.global_batch_size % per_step:
            split = f"parallel.tp {tp}" if tp > 1 else f"parallel.pp {pp}"
            ranks = f"world size ({world_size})" if tp == pp == 1 else \
                f"data-parallel size (world size {world_size} / {split} = {world_size // (tp * pp)})"
            raise ConfigError(
                f"config key 'train.global_batch_size' ({t.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({t.micro_batch_size}) x {ranks} = {per_step}")
        self._world_size, self._grad_accum = world_size, t.global_batch_size // per_step
        if pp > 1 and self.parallel.schedule == "1f1b" and self.grad_accum < pp:
            raise ConfigError(
                f"config key 'parallel.schedule': 1f1b needs at least parallel.pp ({pp}) micro-batches per step, "
                f"got {self.grad_accum} (global batch / (micro-batch x data-parallel size)); lower "
                "train.micro_batch_size, or use gpipe")
        self._optimizer_kwargs = optimizer_kwargs_from_config(self.optimizer)
        if (self.engine.name == "deepspeed" and self.grad_accum > 1
                and self._optimizer_kwargs.get("sam_mode") == "two_pass"):
            raise ConfigError(
                "config key 'optimizer.params.sam_mode': two_pass under DeepSpeed needs one micro-batch per "
                f"rank per step (gradient accumulation is {self.grad_accum}); raise train.micro_batch_size "
                "to global_batch_size / world size, or use one_pass")
        return self

    def _check_parallel(self, world_size: int) -> None:
        """parallel.tp: engine fsdp2, a divisor of the world size and of the head count (then n_embd and the
        MLP's 4·n_embd split too), no dropout (each tp rank would draw its own masks on activations that must
        stay identical across them)."""
        self._check_pipeline(world_size)
        tp = self.parallel.tp
        if tp == 1:
            return
        self._check_split("tp", "tensor", world_size, "n_head", "each tp rank computes whole attention heads")
        if self.model.dropout:
            raise ConfigError(f"config key 'model.dropout' ({self.model.dropout}) must be 0 with parallel.tp "
                              f"({tp}) > 1: the tp ranks would draw different dropout masks on activations that "
                              "must stay the same on all of them")

    def _check_pipeline(self, world_size: int) -> None:
        """parallel.pp: engine fsdp2, a divisor of the world size and of the block count, no tp with it, an untied
        head (the optimizer's pipeline back end counts the stages' params as disjoint: a weight shared by the first
        and last stage would enter ||m|| twice and its two gradients would never be summed)."""
        pp = self.parallel.pp
        if pp == 1:
            return
        self._check_split("pp", "pipeline", world_size, "n_layer", "each stage holds the same number of blocks")
        if self.parallel.tp > 1:
            raise ConfigError(f"config keys 'parallel.pp' ({pp}) and 'parallel.tp' ({self.parallel.tp}): pipeline "
                              "and tensor parallelism together are not supported by this job; set one of them to 1")
        if self.model.tie_embeddings:
            raise ConfigError(f"config key 'model.tie_embeddings' must be false with parallel.pp ({pp}) > 1 (set "
                              "model.tie_embeddings=false): the token embedding (first stage) and the head (last "
                              "stage) would share one weight on two stages, counted twice in the optimizer's norm "
                              "and never given the sum of its two gradients")

    def _check_split(self, key: str, kind: str, world_size: int, along: str, why: str) -> None:
        """parallel.<key> > 1 needs engine fsdp2 and must divide the world size and model.<along>."""
        n, size = getattr(self.parallel, key), getattr(self.model, along)
        if self.engine.name != "fsdp2":
            raise ConfigError(f"config key 'parallel.{key}' ({n}) needs engine.name fsdp2; engine "
                              f"'{self.engine.name}' has no {kind} parallelism in this job (set parallel.{key} to 1, "
                              "or engine.name to fsdp2)")
        if world_size % n:
            raise ConfigError(f"config key 'parallel.{key}' ({n}) must divide the world size ({world_size}): "
                              f"each model replica spans {key} ranks")
        if size % n:
            raise ConfigError(f"config key 'parallel.{key}' ({n}) must divide model.{along} ({size}): {why}")


def json_schema() -> dict:
    """The JSON Schema of a job config file (what --print-schema writes)."""
    schema = JobConfig.model_json_schema()
    opt = OptimizerSection.model_json_schema()
    schema["$defs"].update(opt.pop("$defs", {}))
    schema["$defs"]["OptimizerSection"] = opt
    schema["$defs"]["OptimizerSection"]["properties"]["type"]["default"] = "AdamWMSAMScheduleFree"
    schema["$defs"]["OptimizerSection"]["required"] = []  # the job fills in the type
    schema["properties"]["$schema"] = {"type": "string", "description": "the path or URL of this schema, "
                                       "for editors (ignored by the job)"}
    schema["properties"]["optimizer"] = {"$ref": "#/$defs/OptimizerSection",
                                         "description": schema["properties"]["optimizer"]["description"]}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def _message(err: dict) -> str:
    """One pydantic error as a sentence naming the key, the value and what is allowed."""
    exc = (err.get("ctx") or {}).get("error")
    if isinstance(exc, _OptimizerConfigError):  # our own checks already name the key
        return str(exc)
    loc = [str(p) for p in err["loc"]]
    key, kind, value = ".".join(loc), err["type"], err.get("input")
    if kind == "extra_forbidden":
        model: type[BaseModel] = JobConfig
        for part in loc[:-1]:
            model = model.model_fields[part].annotation
        section = ".".join(loc[:-1]) or "top level"
        return f"unknown config key '{key}' (known keys in '{section}': {', '.join(sorted(model.model_fields))})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"config section '{key}' must be a JSON object, got {type(value).__name__}"
    msg = err["msg"]
    return f"config key '{key}': {msg[:1].lower()}{msg[1:]}, got {value!r}"


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
    """The world size the launcher announced (torchrun/deepspeed, MPI, srun), before any init: the rule of
    :func:`sharded_msam_sf.launch_env.discover`, the one the process group is started with (an sbatch script
    without srun is one process, whatever SLURM_NTASKS says)."""
    from sharded_msam_sf.launch_env import discover
    try:
        return discover().world_size
    except ValueError as e:
        raise ConfigError(f"the launcher's environment: {e}") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), world_size: int | None = None,
                data_path: str | None = None) -> JobConfig:
    """Read, override and validate a job config; raises ConfigError naming the bad key."""
    from sharded_msam_sf.jsonfile import read_json_object
    raw: dict = read_json_object(path, ConfigError) if path is not None else {}
    schema_ref = raw.pop("$schema", None)  # an editor's pointer to docs/job-config.schema.json
    if schema_ref is not None and not isinstance(schema_ref, str):
        raise ConfigError(f"config key '$schema' must be a string (the schema's path or URL), got {schema_ref!r}")
    for item in overrides:
        _set_override(raw, item)
    if data_path is not None:
        raw.setdefault("data", {})["path"] = data_path
    if isinstance(raw.get("optimizer"), dict):  # the job has one optimizer: its type may be left out
        raw["optimizer"].setdefault("type", "AdamWMSAMScheduleFree")
    world_size = env_world_size() if world_size is None else world_size
    try:
        return JobConfig.model_validate(raw, context={"world_size": world_size})
    except pydantic.ValidationError as e:
        raise ConfigError("; ".join(_message(err) for err in e.errors())) from None
