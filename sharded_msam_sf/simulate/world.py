"""One rank of an N-rank job on torch's fake process group, and the engine's device mesh.

``init_process_group("fake", store=FakeStore(), rank=r, world_size=N)``: every collective
returns at once without moving data, so one process runs rank ``r`` of ``N`` (shapes, state
sizes and the collectives issued are real; values are not). Meshes are built on the CPU with
``init_device_mesh`` (on the fake group it creates fake subgroups).

Mesh shapes per engine (``--mesh`` as ``AxB[xC]``; the product must be ``--world``):

=============  ==================================  =================  ==========================
engine         dims                                default mesh       data-parallel dims
=============  ==================================  =================  ==========================
``fsdp2``      ``(dp,)``                           ``N``              dp
``hsdp``       ``(replicate, shard)``              ``(N/8) x 8``      replicate, shard
``fsdp2-tp``   ``(dp, tp)``                        ``(N/8) x 8``      dp
``hsdp-tp``    ``(replicate, shard, tp)``          --mesh required    replicate, shard
``pp-tp``      ``(pp, tp)`` or ``(pp, dp, tp)``    --mesh required    dp (if given)
=============  ==================================  =================  ==========================
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch.distributed as dist

__all__ = ["MESH_DIMS", "parse_mesh", "mesh_shape", "init_fake", "destroy", "make_mesh"]

MESH_DIMS = {
    "fsdp2": (("dp",),),
    "hsdp": (("replicate", "shard"),),
    "fsdp2-tp": (("dp", "tp"),),
    "hsdp-tp": (("replicate", "shard", "tp"),),
    "pp-tp": (("pp", "tp"), ("pp", "dp", "tp")),
}
_DEFAULT_INNER = 8  # the default tp / shard size (one 8-GPU node)


def parse_mesh(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    """``"8x128"`` → ``(8, 128)``; None stays None."""
    if text is None:
        return None
    try:
        shape = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--mesh {text!r}: expected sizes joined by 'x', e.g. 8x128 or 4x32x8") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"--mesh {text!r}: every size must be >= 1")
    return shape


def mesh_shape(engine: str, world: int, mesh: Optional[Tuple[int, ...]]) -> Tuple[Tuple[int, ...], Tuple[str, ...]]:
    """(shape, dim names) of the engine's root mesh for ``world`` ranks (see the module table)."""
    if engine not in MESH_DIMS:
        raise ValueError(f"engine {engine!r} has no device mesh (valid: {', '.join(MESH_DIMS)})")
    if mesh is None:
        if engine == "fsdp2":
            mesh = (world,)
        elif engine in ("hsdp", "fsdp2-tp") and world % _DEFAULT_INNER == 0 and world > _DEFAULT_INNER:
            mesh = (world // _DEFAULT_INNER, _DEFAULT_INNER)
        else:
            raise ValueError(f"--engine {engine} at --world {world}: give --mesh (dims {MESH_DIMS[engine]})")
    names = next((n for n in MESH_DIMS[engine] if len(n) == len(mesh)), None)
    if names is None:
        raise ValueError(f"--mesh {'x'.join(map(str, mesh))} for --engine {engine}: expected dims "
                         f"{' or '.join('x'.join(n) for n in MESH_DIMS[engine])}")
    if math.prod(mesh) != world:
        raise ValueError(f"--mesh {'x'.join(map(str, mesh))} holds {math.prod(mesh)} ranks, not --world {world}")
    return tuple(mesh), names


def init_fake(rank: int, world: int) -> None:
    """This process becomes rank ``rank`` of ``world`` on the fake process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if not 0 <= rank < world:
        raise ValueError(f"--rank {rank} is not in [0, {world})")
    if dist.is_initialized():
        destroy()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def destroy() -> None:
    """Tear the fake group down (another rank or world can be simulated next in this process)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    try:  # the meshes cache their groups by dim names: a new world must build new ones
        from torch.distributed.device_mesh import _mesh_resources
        for attr in ("mesh_stack", "child_to_root_mapping", "root_to_flatten_mapping", "flatten_name_to_root_dims",
                     "mesh_dim_group_options"):
            obj = getattr(_mesh_resources, attr, None)
            if hasattr(obj, "clear"):
                obj.clear()
    except ImportError:  # pragma: no cover
        pass


def make_mesh(shape: Tuple[int, ...], names: Tuple[str, ...]):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", shape, mesh_dim_names=names)
