"""DeepSpeed ZeRO-1/2/3 (and offload): per-rank memory with our 12 B per element, from shapes.

DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs_all_live`` and friends)
assume Adam's 8 B of state per param, take no optimizer, and on a meta model count distinct
``data_ptr()`` values (all 0), so a 7B model reads as one parameter's worth. Here P is the sum of
``numel()`` over the distinct parameters, and the partition follows DeepSpeed 0.19's layout
(read in ``stage_1_and_2.py`` / ``stage3.py``, checked against an engine built on the fake group
by ``tests/test_simulate.py``):

- ZeRO-1/2: one flat buffer per param group, padded to a multiple of ``2·N`` elements
  (``nccl_start_alignment_factor = 2`` times the data-parallel size); every rank holds
  ``ceil(P_g / 2N)·2`` elements of it (the last rank's share ends in padding, zero in m);
- ZeRO-3: every param partitioned alone, ``ceil(numel/N)`` elements per rank.

Per rank, with ``part`` the rank's partition elements and bit16 (bf16/fp16) training:

=================  ===================  ==================  ==================
bytes              ZeRO-1               ZeRO-2              ZeRO-3
=================  ===================  ==================  ==================
bit16 params       2·P                  2·P                 2·part
bit16 grads        2·P                  2·part              2·part
fp32 masters       4·part               4·part              4·part
optimizer state    12·part (AdamW 8)    12·part             12·part
=================  ===================  ==================  ==================

``offload_optimizer`` (``device: cpu``) moves the masters and the state (and, ZeRO-2/3, an fp32
copy of the gradient partition, 4·part) to host memory; ``offload_param`` (ZeRO-3) moves the
bit16 param partition there too. fp32 training: the "bit16" params and grads are fp32 (4 B).
Activations and communication buckets are not counted (the same for both optimizers).
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

__all__ = ["partition_elements", "zero_estimate"]

STATE = 12
ADAMW_STATE = 8


def partition_elements(numels: Sequence[int], n: int, stage: int) -> int:
    """Elements of the fp32 partition of one param group of ``numels`` on each rank of ``n``."""
    if stage in (1, 2):
        total = sum(numels)
        align = 2 * n
        return -(-total // align) * align // n
    if stage == 3:
        return sum(-(-k // n) for k in numels)
    raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage}")


def zero_estimate(numels: Sequence[int], n: int, stage: int, *, bit16: bool = True, offload_optimizer: bool = False,
                  offload_param: bool = False) -> Dict[str, Any]:
    """The per-rank bytes of the table above, ours and AdamW's (one param group)."""
    if offload_param and stage != 3:
        raise ValueError("offload_param is ZeRO-3 only")
    p = sum(numels)
    part = partition_elements(numels, n, stage)
    w = 2 if bit16 else 4
    params = w * (part if stage == 3 else p)
    grads = w * (part if stage >= 2 else p)
    masters = 4 * part
    state, adamw_state = STATE * part, ADAMW_STATE * part
    host_grads = 4 * part if offload_optimizer and stage >= 2 else 0
    host_params = params if offload_param else 0
    device_common = (params - host_params) + grads
    if offload_optimizer:
        dev, dev_adamw = device_common, device_common
        host, host_adamw = masters + state + host_grads + host_params, masters + adamw_state + host_grads + host_params
    else:
        dev, dev_adamw = device_common + masters + state, device_common + masters + adamw_state
        host, host_adamw = host_params, host_params
    return {
        "stage": stage, "world": n, "param_elements": p, "local_param_elements": part,
        "param_bytes": params, "grad_bytes": grads, "master_bytes": masters, "state_bytes": state,
        "adamw_state_bytes": adamw_state, "offload_optimizer": offload_optimizer, "offload_param": offload_param,
        "device_bytes": dev, "adamw_device_bytes": dev_adamw, "host_bytes": host, "adamw_host_bytes": host_adamw,
        "peak_bytes": dev + host, "adamw_peak_bytes": dev_adamw + host_adamw,
        "vs_adamw": (dev + host) / (dev_adamw + host_adamw),
    }
