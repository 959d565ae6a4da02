"""A DeepSpeed *universal* checkpoint with AdamWMSAMScheduleFree's state, loaded into a ZeRO-1/2/3 engine
of any world size: :func:`load_universal` (every DeepSpeed internal it touches is listed here; the
rest of the DeepSpeed glue is in :mod:`sharded_msam_sf.deepspeed` (the driver: :mod:`.driver`)).

The checkpoint (written by ``python -m sharded_msam_sf.checkpoint to-universal``) holds, per parameter
``<name>``, the full unpartitioned tensors ``zero/<name>/{fp32,exp_avg,exp_avg_sq,z}.pt`` (each
``{"param": tensor}``), ``zero/optimizer_state.pt`` (the param groups: our per-group counters ``k``,
``weight_sum``, ``lr_max``, mode ``train_mode``/``at_ascent``, ``ascent_scale``, ...; the loss scaler)
and ``mp_rank_00_model_states.pt`` (the engine's step counters).

ZeRO-1/2 (and bf16 on them): DeepSpeed's own loader, ``engine.load_checkpoint`` with the engine's
``_config.load_universal_checkpoint`` set for the call. It is generic over the state keys: it loads
every ``<key>.pt`` of a param folder (``universal_checkpoint.load_hp_checkpoint_state``, the keys
from ``os.listdir``) and copies every param group (``base_optimizer.load_hp_checkpoint_state_from_
checkpoint_dir``, ``zip(self.optimizer.param_groups, optim_sd['param_groups'])``).

ZeRO-3: DeepSpeed 0.19's loader (``DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_
checkpoint_dir_stage3``, deepspeed/runtime/zero/stage3.py) loads only ``for key in ["fp32",
"exp_avg", "exp_avg_sq"]`` and copies ``optim_sd[OPTIMIZER_STATE_DICT]["param_groups"][0]`` into every
group: it would drop z (our optimizer would start z afresh from the params) and the counters of every
group but the first. So :func:`load_universal` does that load itself, with DeepSpeed's pieces and
nothing patched: for each ZeRO-3 sub-group ``s`` and each key of the universal folders, this rank's
partition of every param of ``fp16_groups[s]`` (``load_hp_checkpoint_state(folder, key, param)``:
``ceil(numel / world)`` elements per rank, zero padded, as ZeRO-3 partitions) laid end to end into a
tensor like ``fp32_partitioned_groups_flat[s]`` — the master itself for ``fp32``, the optimizer state
``state[master][key]`` for the others; every param group's own saved values (``param_groups[i]``);
the loss scaler (``_load_global_state_stage3``); the engine's ``global_steps``, ``global_samples``,
``skipped_steps``; then the masters are pushed into the partitioned bit16 weights
(``checkpoint_event_prologue``, ``_reassign_or_swap_out_partitioned_parameters(s)``,
``checkpoint_event_epilogue``: what DeepSpeed's checkpoint load does).

The DeepSpeed internals used: ``engine._config.load_universal_checkpoint`` (set for the call),
``engine.global_steps``/``global_samples``/``skipped_steps``; of the ZeRO-3 optimizer
``fp16_groups``, ``fp32_partitioned_groups_flat``, ``param_names``, ``load_hp_checkpoint_state``,
``_load_global_state_stage3``, ``checkpoint_event_prologue``/``epilogue``,
``_reassign_or_swap_out_partitioned_parameters``, ``swap_optimizer``/``offload_param``.
Tested: ZeRO-1/2/3 targets of 1, 2 and 4 ranks, fp32 and bf16 (ZeRO-2); BF16_Optimizer and fp16 not.

A universal checkpoint without ``z.pt`` (DeepSpeed's own ``ds_to_universal.py`` output) is refused:
loading it would restart z from the params, a silently different run.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Dict, List

import torch

__all__ = ["UNIVERSAL_KEYS", "deepspeed_safe_globals", "load_universal", "UniversalCheckpointError"]

UNIVERSAL_KEYS = ("fp32", "exp_avg", "exp_avg_sq", "z")
CONVERT_COMMAND = "python -m sharded_msam_sf.checkpoint to-universal CKPT OUT"


class UniversalCheckpointError(RuntimeError):
    """A universal checkpoint that cannot be loaded into this engine (the message says what to run)."""


def deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its checkpoint files pickle, for ``torch.load(weights_only=True)``."""
    out = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        out += [LossScaler, DynamicLossScaler]
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum
        out.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address
        out.append(fragment_address)
    return out


def _load(path: Path) -> Any:
    if not path.is_file():
        raise UniversalCheckpointError(f"{path} is missing: not a universal checkpoint written by `{CONVERT_COMMAND}`")
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _check(path: Path, names: List[str]) -> dict:
    """The global optimizer state; every param folder must hold z (else: DeepSpeed's converter's output)."""
    zero = path / "zero"
    for name in names:
        if not (zero / name / "z.pt").is_file():
            raise UniversalCheckpointError(
                f"{zero / name} has no z.pt: a universal checkpoint without AdamWMSAMScheduleFree's z (DeepSpeed's "
                f"ds_to_universal.py drops it) would restart z from the params. Convert the original checkpoint "
                f"with `{CONVERT_COMMAND}`")
    sd = _load(zero / "optimizer_state.pt")
    if not isinstance(sd, dict) or not isinstance(sd.get("param_groups"), list):
        raise UniversalCheckpointError(f"{zero / 'optimizer_state.pt'} holds no param groups")
    return sd


def load_universal(engine: Any, path: os.PathLike | str) -> None:
    """Load the universal checkpoint directory ``path`` into the DeepSpeed ``engine`` (ZeRO-1/2/3, any
    world size; collective): the fp32 masters, z, exp_avg, exp_avg_sq, every param group's counters
    and mode, the loss scaler and the engine's step counters; the bit16 weights follow the masters."""
    path = Path(path)
    zero = engine.optimizer
    names = [zero.param_names[p] for g in _lp_groups(zero) for p in g]
    global_sd = _check(path, names)
    if len(global_sd["param_groups"]) != len(zero.optimizer.param_groups):
        raise UniversalCheckpointError(
            f"{path}: {len(global_sd['param_groups'])} param groups saved, the engine's optimizer has "
            f"{len(zero.optimizer.param_groups)}: a checkpoint of another model or parameter grouping; build the "
            f"engine with the model and param groups it was saved from (or convert that model's checkpoint with "
            f"`{CONVERT_COMMAND}`)")
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        _load_zero3(engine, path, global_sd)
    else:
        _load_deepspeed(engine, path)


def _lp_groups(zero: Any) -> list:
    for attr in ("fp16_groups", "bit16_groups", "bf16_groups"):
        if hasattr(zero, attr):
            return getattr(zero, attr)
    raise UniversalCheckpointError(f"{type(zero).__name__}: not a ZeRO optimizer this loader knows")


def _load_deepspeed(engine: Any, path: Path) -> None:
    cfg = engine._config
    before = cfg.load_universal_checkpoint
    cfg.load_universal_checkpoint = True
    try:
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
    finally:
        cfg.load_universal_checkpoint = before
    if loaded is None:
        raise UniversalCheckpointError(f"DeepSpeed could not load the universal checkpoint {path} (no "
                                       f"mp_rank_*_model_states.pt?); write it again with `{CONVERT_COMMAND}`")
    missing = [i for i, g in enumerate(engine.optimizer.optimizer.param_groups)
               for p in g["params"] if "z" not in engine.optimizer.optimizer.state.get(p, {})]
    if missing:
        raise UniversalCheckpointError(f"{path}: DeepSpeed's loader left group(s) {sorted(set(missing))} without z; "
                                       f"write it again with `{CONVERT_COMMAND}`")


@torch.no_grad()
def _load_zero3(engine: Any, path: Path, global_sd: dict) -> None:
    zero = engine.optimizer
    if getattr(zero, "swap_optimizer", False) or getattr(zero, "offload_param", False):
        raise UniversalCheckpointError("ZeRO-3 with NVMe optimizer swapping or parameter offload: loading a "
                                       "universal checkpoint is not supported; resume without them (remove "
                                       "zero_optimization.offload_param and offload_optimizer.device=nvme), or "
                                       "under ZeRO-1/2")
    model_sd = _load(path / "mp_rank_00_model_states.pt")
    opt = zero.optimizer
    folder = path / "zero"
    zero.checkpoint_event_prologue()
    for s, group in enumerate(zero.fp16_groups):
        master = zero.fp32_partitioned_groups_flat[s]
        keys = sorted({f[:-3] for p in group for f in os.listdir(folder / zero.param_names[p]) if f.endswith(".pt")})
        state: Dict[str, torch.Tensor] = {}
        for key in keys:
            if key == "step":
                continue
            flat = torch.zeros_like(master)
            offset = 0
            for p in group:
                part = zero.load_hp_checkpoint_state(str(folder / zero.param_names[p]), key, param=p)
                flat.narrow(0, offset, part.numel()).copy_(part)
                offset += part.numel()
            if key == "fp32":
                master.data.copy_(flat)
            else:
                state[key] = flat
        opt.state[master] = state
    for group, saved in zip(opt.param_groups, global_sd["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})
    zero._load_global_state_stage3(global_sd)
    for s in range(len(zero.fp32_partitioned_groups_flat)):
        zero._reassign_or_swap_out_partitioned_parameters(s)
    zero.checkpoint_event_epilogue()
    engine.global_steps = model_sd["global_steps"]
    engine.global_samples = model_sd.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = model_sd["skipped_steps"]
