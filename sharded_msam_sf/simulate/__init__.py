"""Scale by simulation: one rank of an N-rank job on torch's fake process group.

``python -m sharded_msam_sf.simulate --model llama-7b --engine fsdp2 --world 1024 --rank 5``
builds the model on the meta device (or from ``--model-config config.json``), wraps it the way
the engine does on a fake group of ``--world`` ranks (``init_process_group("fake", ...)``: no
data moves, nothing is allocated), builds :class:`~sharded_msam_sf.AdamWMSAMScheduleFree` on it
and runs one step, then reports that rank's local elements, optimizer state bytes, fp32 masters,
the reduction (group size, replica counts divided out, each element of ``||m||`` counted once),
the optimizer's collectives in one step, and its memory against AdamW. docs/scale.md has the
measured table and what a fake group cannot check (values: the norm itself, NaN agreement,
trajectories — the real-rank tests check those).

Modules, one concern each: :mod:`.models` (presets, HF configs on meta), :mod:`.world` (the fake
group, meshes), :mod:`.engines` (FSDP2 / HSDP / TP / PP wrapping), :mod:`.measure` (the
optimizer's step and its counts), :mod:`.shape_rule` (DTensor's rule for every rank,
``--all-ranks``), :mod:`.memory` and :mod:`.zero_estimate` (bytes per rank, ours and AdamW's),
:mod:`.zero_run` (DeepSpeed built on the fake group), :mod:`.report` (table and JSON),
:mod:`.cli` (the command line).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

__all__ = ["simulate", "ENGINES", "MESH_ENGINES", "ZERO_ENGINES"]

MESH_ENGINES = ("fsdp2", "hsdp", "fsdp2-tp", "hsdp-tp", "pp-tp")
ZERO_ENGINES = ("zero1", "zero2", "zero3")
ENGINES = MESH_ENGINES + ZERO_ENGINES


def simulate(cfg: Dict[str, Any], engine: str, world: int, rank: int = 0, *, mesh: Optional[Tuple[int, ...]] = None,
             sam_mode: str = "one_pass", all_ranks: bool = False, flatten: bool = False, offload: bool = False,
             deepspeed_run: bool = False, bf16: bool = True) -> Dict[str, Any]:
    """The report of rank ``rank`` of ``world`` for the model config ``cfg`` (see the module docstring)."""
    from ..hyperparams import SAM_MODES
    if sam_mode not in SAM_MODES:
        raise ValueError(f"--sam-mode {sam_mode!r} (valid: {', '.join(SAM_MODES)})")
    if world < 1:
        raise ValueError(f"--world must be >= 1, got {world}")
    if engine in MESH_ENGINES:
        if offload or deepspeed_run:
            raise ValueError("--offload and --deepspeed-run are for the ZeRO engines")
        from .mesh_run import simulate_mesh
        return simulate_mesh(cfg, engine, world, rank, mesh=mesh, sam_mode=sam_mode, all_ranks=all_ranks,
                             flatten=flatten)
    if engine in ZERO_ENGINES:
        if mesh is not None or all_ranks or flatten:
            raise ValueError("--mesh, --all-ranks and --flatten are for the device-mesh engines")
        from .zero_sim import simulate_zero
        return simulate_zero(cfg, int(engine[-1]), world, rank, sam_mode=sam_mode, offload=offload,
                             deepspeed_run=deepspeed_run, bf16=bf16)
    raise ValueError(f"unknown --engine {engine!r} (valid: {', '.join(ENGINES)})")
