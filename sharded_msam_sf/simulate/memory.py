"""Per-rank memory of the model states, ours against AdamW.

Counted: the rank's parameters, its gradients and the optimizer state (``z, v, m`` in fp32:
12 B per local element; AdamW's ``m, v``: 8 B), plus fp32 masters where the engine keeps a
second copy (ZeRO with bf16). Not counted: activations, the all-gathered (unsharded) params of
the layer being computed and the communication buffers — they are the same for both optimizers,
depend on batch and sequence length, and the fake group cannot measure them (run torch's
``FSDPMemTracker`` on a real device for those). So ``peak_bytes`` is a floor, and the
difference ``peak_bytes − adamw_peak_bytes`` (4 B per local element) is exact.
"""
from __future__ import annotations

from typing import Any, Dict

__all__ = ["mesh_estimate", "ADAMW_STATE_BYTES_PER_ELEMENT", "COUNTS"]

ADAMW_STATE_BYTES_PER_ELEMENT = 8
COUNTS = "params + grads + optimizer state (+ fp32 masters); activations and all-gather buffers not counted"


def mesh_estimate(report: Dict[str, Any]) -> Dict[str, Any]:
    """FSDP2 / HSDP / TP / PP: fp32 sharded params, fp32 sharded grads (reduce-scattered), our state."""
    n = report["local_param_elements"]
    params = report["param_bytes"]
    grads = params
    ours = params + grads + report["state_bytes"] + report["master_bytes"]
    adamw = params + grads + ADAMW_STATE_BYTES_PER_ELEMENT * n + report["master_bytes"]
    return {"param_bytes": params, "grad_bytes": grads, "state_bytes": report["state_bytes"],
            "master_bytes": report["master_bytes"], "peak_bytes": ours, "adamw_peak_bytes": adamw,
            "adamw_state_bytes": ADAMW_STATE_BYTES_PER_ELEMENT * n, "vs_adamw": ours / adamw if adamw else 1.0,
            "counts": COUNTS}
