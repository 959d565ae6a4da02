"""Build DeepSpeed ZeRO-1/2/3 with our optimizer on the fake group and measure one rank.

The model must hold real tensors (DeepSpeed flattens and copies them; ZeRO-3 builds it inside
``deepspeed.zero.Init``, so a rank holds only its partition), so this is for models that fit
the host: the estimate of :mod:`.zero_estimate` is what scales, and this run is its
calibration (``tests/test_simulate.py`` compares them field by field). One training step runs
(forward, ``engine.backward``, ``engine.step``) on token ids; on the fake group the gathered
values are garbage, so the step may be skipped as non-finite — the collectives are the same.
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from typing import Any, Dict

import torch

from ..testing.comm_count import CommCounter
from . import models, world
from .measure import calls_of, local

__all__ = ["simulate_deepspeed"]


def _ds_config(stage: int, sam_mode: str, bf16: bool, offload_optimizer: bool) -> Dict[str, Any]:
    zero: Dict[str, Any] = {"stage": stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "bf16": {"enabled": bf16},
            "optimizer": {"type": "AdamWMSAMScheduleFree", "params": {"lr": 1e-3, "sam_mode": sam_mode}}}


def _partitions(zero_opt, stage: int):
    if stage == 3:
        return list(zero_opt.fp32_partitioned_groups_flat)
    groups = getattr(zero_opt, "single_partition_of_fp32_groups", None)
    if groups is None:  # the BF16_Optimizer path (bf16 + ZeRO-1)
        groups = zero_opt.fp32_groups_flat_partition
    return list(groups)


@contextlib.contextmanager
def _no_cross_rank_asserts(stage: int):
    """ZeRO-3 checks at each forward that every rank traced the same module order, by broadcasting
    rank 0's list; a fake group broadcasts nothing, so that check (which it cannot answer) is off
    while the simulated step runs (``partitioned_param_coordinator.assert_ints_same_as_other_ranks``)."""
    if stage != 3:
        yield
        return
    from unittest import mock

    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc
    with mock.patch.object(ppc, "assert_ints_same_as_other_ranks", lambda ints: None):
        yield


def _one_step(cfg, stage: int, sam_mode: str, bf16: bool, offload_optimizer: bool, seq: int, optimizer: str):
    """Build the engine (ours or torch's AdamW) and run one step; (engine, our optimizer or None, step records)."""
    import deepspeed

    from ..deepspeed import initialize
    config = _ds_config(stage, sam_mode, bf16, offload_optimizer)
    torch.manual_seed(0)
    if stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = models.build_meta_model(cfg, device="cpu")
    else:
        model = models.build_meta_model(cfg, device="cpu")
    numels = [p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()]
    ids = torch.randint(0, cfg["vocab_size"], (1, seq))
    with _no_cross_rank_asserts(stage), CommCounter() as cc:  # entered before initialize: DeepSpeed caches some collectives
        if optimizer == "ours":
            engine, facade, _, _ = initialize(model=model, config=config)
            facade.train()
        else:
            config.pop("optimizer")
            config["zero_allow_untested_optimizer"] = True
            config["zero_force_ds_cpu_optimizer"] = False  # (offload: the baseline is torch's AdamW)
            engine, facade, _, _ = deepspeed.initialize(model=model, config=config,
                                                        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
        cc.reset()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        if optimizer == "ours" and sam_mode == "two_pass":
            facade.move_to_ascent()
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            facade.move_from_ascent()
        engine.step()
    return engine, facade, list(cc.records), numels


def _extra(ours, adamw):
    """The calls of ``ours`` beyond ``adamw``'s (a multiset difference by op, bytes, group, shape)."""
    left = Counter((c.name, c.bytes, c.group_size, c.shape) for c in adamw)
    out = []
    for c in ours:
        key = (c.name, c.bytes, c.group_size, c.shape)
        if left[key]:
            left[key] -= 1
        else:
            out.append(c)
    return out


def simulate_deepspeed(cfg: Dict[str, Any], stage: int, n: int, rank: int, *, sam_mode: str = "one_pass",
                       bf16: bool = True, offload_optimizer: bool = False, seq: int = 8) -> Dict[str, Any]:
    """The measured report of rank ``rank`` of ``n`` under ZeRO-``stage`` (see the module docstring).
    ``collectives_per_step``: the calls of the step (forward, backward(s), step) with our optimizer
    beyond those of the same engine with ``torch.optim.AdamW`` (two_pass: its extra pass's engine
    collectives are left out, they are the engine's)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    world.init_fake(rank, n)
    try:
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo")
        _, _, adamw_calls, _ = _one_step(cfg, stage, "one_pass", bf16, offload_optimizer, seq, "adamw")
        engine, facade, our_calls, numels = _one_step(cfg, stage, sam_mode, bf16, offload_optimizer, seq, "ours")
        calls = calls_of(_extra(our_calls, adamw_calls))
        ours = facade.optimizer if hasattr(facade, "optimizer") else facade
        parts = _partitions(engine.optimizer, stage)
        state = getattr(ours, "state", {})
        state_bytes = sum(local(t).numel() * local(t).element_size()
                          for st in state.values() for t in st.values() if isinstance(t, torch.Tensor))
        part = sum(t.numel() for t in parts)
        first = next(iter(next(iter(state.values())).values())) if state else None
        return {
            "engine": f"zero{stage}" + ("-offload" if offload_optimizer else ""), "world": n, "rank": rank,
            "sam_mode": sam_mode, "param_elements": sum(numels), "local_param_elements": part,
            "state_bytes": state_bytes, "master_bytes": sum(t.numel() * t.element_size() for t in parts),
            "state_is_12x_local": state_bytes == 12 * part,
            "collectives_per_step": calls, "measured": "deepspeed engine on the fake group",
            "reduction_group_size": calls[0]["group_size"] if calls else None,
            "replicas_divided_out": {"1": part},
            "state_device": str(first.device) if first is not None else None,
        }
    finally:
        _forget_deepspeed_groups()
        world.destroy()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches its process groups in ``deepspeed.utils.groups``; the fake group they belong to is
    destroyed after each simulation, so the cache is emptied (a next run in this process builds new ones)."""
    from deepspeed.utils import groups
    for name, value in list(vars(groups).items()):
        if not name.startswith("_") or name.startswith("__") or name == "_DEVICE_MESH_SPLIT_UNSUPPORTED":
            continue
        if isinstance(value, dict):
            value.clear()
        elif not callable(value) and not isinstance(value, type(groups)):
            setattr(groups, name, None)
