"""ZeRO-1/2/3 for one rank: the estimate from the meta model's shapes (:mod:`.zero_estimate`), the
optimizer's collectives (one all-reduce of G + 1 float64 over the data-parallel group per gradient
evaluation: :mod:`sharded_msam_sf.backends.zero`), and with ``deepspeed_run`` the same fields measured
on a DeepSpeed engine built on the fake group (:mod:`.zero_run`; real tensors: small models only)."""
from __future__ import annotations

from typing import Any, Dict

from . import models
from .zero_estimate import zero_estimate

__all__ = ["simulate_zero"]

NOTE = ("DeepSpeed's own estimators assume Adam's 8 B/param and, on a meta model, count distinct data_ptr()s "
        "(all 0); this estimate counts numel() with 12 B/param")


def simulate_zero(cfg: Dict[str, Any], stage: int, n: int, rank: int, *, sam_mode: str = "one_pass",
                  offload: bool = False, deepspeed_run: bool = False, bf16: bool = True,
                  model=None) -> Dict[str, Any]:
    """The estimate for rank ``rank`` of ``n`` (``model``: a meta model given, else ``cfg``'s)."""
    if not 0 <= rank < n:
        raise ValueError(f"--rank {rank} is not in [0, {n})")
    if deepspeed_run and model is not None:
        raise ValueError("the DeepSpeed run builds the HF model of cfg; not with a model given")
    model = models.build_meta_model(cfg) if model is None else model
    numels = [p.numel() for p in model.parameters() if p.requires_grad]
    est = zero_estimate(numels, n, stage, bit16=bf16, offload_optimizer=offload)
    evaluations = 2 if sam_mode == "two_pass" else 1
    calls = [{"op": "all_reduce", "bytes": 8 * 2, "group_size": n, "shape": [2]}] * evaluations if n > 1 else []
    report: Dict[str, Any] = {
        "engine": f"zero{stage}" + ("-offload" if offload else ""), "world": n, "rank": rank, "sam_mode": sam_mode,
        "param_elements": est["param_elements"], "local_param_elements": est["local_param_elements"],
        "state_bytes": est["state_bytes"], "master_bytes": est["master_bytes"],
        "state_is_12x_local": est["state_bytes"] == 12 * est["local_param_elements"],
        "reduction_group_size": n, "replicas_divided_out": {"1": est["local_param_elements"]},
        "collectives_per_step": calls, "collectives_source": "estimate (backends.zero: one all-reduce per "
                                                              "gradient evaluation)",
        "memory": dict(est, counts="bit16 params + grads + fp32 masters + optimizer state; activations and "
                                   "buckets not counted"),
        "deepspeed_estimate_note": NOTE,
    }
    if deepspeed_run:
        from .zero_run import simulate_deepspeed
        measured = simulate_deepspeed(cfg, stage, n, rank, sam_mode=sam_mode, bf16=bf16, offload_optimizer=offload)
        report["deepspeed_run"] = measured
        report["estimate_matches_run"] = {k: measured[k] == report[k] for k in
                                          ("local_param_elements", "state_bytes", "master_bytes")}
        report["collectives_per_step"] = measured["collectives_per_step"]
        report["collectives_source"] = measured["measured"]
    return report
