"""``--dry-run --simulate-world N``: the simulation report (:mod:`sharded_msam_sf.simulate`) for the job's
own config at N ranks, in this one process, on torch's fake process group (nothing is trained, no
rank is started, the config's out_dir is not touched).

The job's GPT is built on the meta device and wrapped as the job's engine wraps it:

- ``fsdp2``: ``fully_shard`` per block and at the root on a 1-D mesh of N ranks (``parallel.tp > 1``:
  the job's own tensor-parallel plan, :func:`sharded_msam_sf.job.tensor_parallel.parallelize_gpt`,
  on a (N/tp) × tp mesh, then ``fully_shard`` over dp);
- ``ddp``: every rank holds the whole model, the optimizer reduces over all N ranks (replicas N);
- ``deepspeed``: the ZeRO estimate of :mod:`sharded_msam_sf.simulate.zero_estimate` for
  ``engine.zero_stage`` (offload if ``engine.deepspeed`` sets ``zero_optimization.offload_optimizer``).

Not simulated (a clear error): ``fsdp1`` and ``parallel.pp > 1`` (use ``python -m
sharded_msam_sf.simulate --engine pp-tp`` for a pipeline layout).
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional

from .config import ConfigError, JobConfig

__all__ = ["simulate_job"]


def _report(cfg: JobConfig, world: int, rank: int) -> Dict[str, Any]:
    import torch.distributed as dist

    from ..simulate.mesh_run import simulate_mesh
    from ..simulate.zero_sim import simulate_zero
    from .engines import build_model
    kwargs = dict(cfg.optimizer_kwargs)
    sam_mode = kwargs.get("sam_mode", "one_pass")
    name, tp, pp = cfg.engine.name, cfg.parallel.tp, cfg.parallel.pp
    if pp > 1:
        raise ConfigError("--simulate-world: parallel.pp > 1 is not simulated for the job; "
                          "use python -m sharded_msam_sf.simulate --engine pp-tp")
    if name == "deepspeed":
        zero = cfg.engine.deepspeed.get("zero_optimization", {})
        offload = zero.get("offload_optimizer", {}).get("device", "none") not in (None, "none")
        return simulate_zero({}, cfg.engine.zero_stage, world, rank, sam_mode=sam_mode, offload=offload,
                             bf16=cfg.engine.dtype != "fp32", model=build_model(cfg, "meta"))
    if name == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        def wrap(model, root):
            dp = root["dp"]
            if tp > 1:
                from .tensor_parallel import parallelize_gpt
                parallelize_gpt(model, root["tp"])
            for block in model.blocks:
                fully_shard(block, mesh=dp)
            fully_shard(model, mesh=dp)
            return model, {}
        engine, mesh = ("fsdp2-tp", (world // tp, tp)) if tp > 1 else ("fsdp2", (world,))
        return simulate_mesh({}, engine, world, rank, mesh=mesh, sam_mode=sam_mode,
                             build=lambda: build_model(cfg, "meta"), wrap=wrap, optimizer_kwargs=kwargs)
    if name == "ddp":
        return simulate_mesh({}, "fsdp2", world, rank, mesh=(world,), sam_mode=sam_mode,
                             build=lambda: build_model(cfg, "meta"),
                             wrap=lambda model, root: (model, {"process_group": dist.group.WORLD}),
                             optimizer_kwargs=kwargs)
    raise ConfigError(f"--simulate-world: engine.name={name!r} is not simulated (fsdp2, ddp and deepspeed are)")


def simulate_job(cfg: JobConfig, world: int, rank: int = 0, json_path: Optional[str] = None) -> int:
    """Print the report for rank ``rank`` of ``world`` (and write it to ``json_path``); the exit status."""
    from ..simulate.report import table, write_json
    report = _report(cfg, world, rank)
    report["engine"] = f"job:{cfg.engine.name}" + (f"+tp{cfg.parallel.tp}" if cfg.parallel.tp > 1 else "") \
        + (f" zero{cfg.engine.zero_stage}" if cfg.engine.name == "deepspeed" else "")
    table(report, sys.stdout)
    if json_path:
        write_json(report, json_path)
    return 0
