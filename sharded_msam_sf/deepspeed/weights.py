"""The weights of a DeepSpeed engine's module: :func:`gathered` (the one ZeRO-3 gather helper) and
:func:`full_fp32_state_dict` (the one weight export: the fp32 masters, full, on the CPU).

DeepSpeed internals used: ``deepspeed.zero.GatheredParameters`` and
``deepspeed.utils.safe_get_full_fp32_param`` (public API), a ZeRO-3 param's ``ds_id``.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gathered", "full_fp32_state_dict"]


def _is_zero3(p: Tensor) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[Tensor]) -> Iterator[None]:
    """Inside, ZeRO-3 partitioned ``params`` hold their full bit16 values (read only; collective:
    every rank enters with the same params). Other params are left as they are."""
    ps = [p for p in params if _is_zero3(p)]
    if not ps:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(ps, modifier_rank=None):
        yield


@torch.no_grad()
def full_fp32_state_dict(module: torch.nn.Module, rank0_only: bool = False) -> Optional[Dict[str, Tensor]]:
    """``module.state_dict()`` of a DeepSpeed engine's module, full and on the CPU, with every trainable
    parameter taken from its fp32 master (``deepspeed.utils.safe_get_full_fp32_param``), whatever the
    model's dtype: the exact fp32 weights the optimizer holds (x in eval mode, y in train mode). They
    are not rounded: a bf16/fp16 model's ``engine.module`` computes with these cast by ``.to(dtype)``
    (round to nearest even, the copy DeepSpeed does), so ``sd[k].to(dtype)`` equals its weights bit for
    bit. Frozen parameters (no master) and buffers are gathered and given in their own dtype.
    Collective (every rank calls it); with ``rank0_only`` the other ranks get None."""
    from deepspeed.utils import safe_get_full_fp32_param
    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    tensors = module.state_dict(keep_vars=True)
    frozen = [t for t in tensors.values() if isinstance(t, torch.nn.Parameter) and not t.requires_grad]
    out: Dict[str, Tensor] = {}
    masters: Dict[int, Tensor] = {}
    for name, t in tensors.items():  # the same order on every rank: the collectives pair up
        if isinstance(t, torch.nn.Parameter) and t.requires_grad:
            if id(t) not in masters:
                full = safe_get_full_fp32_param(t)
                if full is None:
                    raise RuntimeError(f"{name}: DeepSpeed holds no fp32 master for this trainable parameter; "
                                       f"is the module wrapped by a DeepSpeed engine?")
                masters[id(t)] = full.detach().float().cpu().clone()
            if keep:
                out[name] = masters[id(t)]
    with gathered(frozen):
        for name, t in tensors.items():
            if keep and not (isinstance(t, torch.nn.Parameter) and t.requires_grad):
                out[name] = t.detach().cpu().clone()
    return out if keep else None
