"""A tiny transformer-ish model wrapped the torchtitan way: tensor parallel over a ``tp`` mesh dim
(``parallelize_module``: Colwise/Rowwise, SequenceParallel on the blocks' LayerNorms), then
``fully_shard`` over the data-parallel submesh per block and at the root.

The model takes the shared tests' batches (``sharded_common.global_batch``: ``(n, D_IN)`` →
``(n, 1)``), so that ``sharded_common``'s loop, control run and checks apply unchanged: the input
is embedded and given a learned position per token of a short sequence (``SEQ`` tokens, split
over the tp ranks inside the blocks), and the output is the mean over the sequence.

Parameters that are NOT tensor-parallel, replicated across the tp ranks (their DTensors live on
the dp submesh only): ``emb``, ``pos``, ``gain``, ``norm``, ``head``. ``gain`` gets no gradient on
every third forward (a parameter without gradients in some steps). Tensor-parallel ones:
``up`` (Colwise: weight and bias sharded over tp), ``down`` (Rowwise: weight sharded, bias
replicated over tp), the blocks' LayerNorms (SequenceParallel: replicated over tp)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests import sharded_common as C

HIDDEN = 16
SEQ = 4

# engine -> (mesh shape, mesh dim names, the data-parallel dims)
LAYOUTS = {
    "fsdp2_tp": ((2, 2), ("dp", "tp"), ("dp",)),
    "hsdp_tp": ((2, 2, 2), ("replicate", "shard", "tp"), ("replicate", "shard")),
}


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, h):
        return h + self.down(torch.tanh(self.up(self.norm(h))))


class TinyTransformer(nn.Module):
    def __init__(self, d: int = HIDDEN) -> None:
        super().__init__()
        self.emb = nn.Linear(C.D_IN, d)
        self.pos = nn.Parameter(0.1 * torch.randn(SEQ, d))
        self.gain = nn.Parameter(torch.ones(d))
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = self.emb(x).unsqueeze(1) + self.pos          # (n, SEQ, d)
        if self.calls % 3:
            h = h * self.gain                             # no gradient for gain on every third forward
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)).mean(1)           # (n, 1)


def make_model(seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer()


_MESHES: dict = {}


def mesh_for(engine: str):
    """The engine's root mesh, made once per process (making one creates process groups)."""
    if engine not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh
        shape, names, _ = LAYOUTS[engine]
        _MESHES[engine] = init_device_mesh("cpu", shape, mesh_dim_names=names)
    return _MESHES[engine]


def wrap(engine: str, model: TinyTransformer, mesh=None) -> TinyTransformer:
    """Tensor parallel over ``mesh["tp"]`` (the sequence split over tp between the blocks), then
    ``fully_shard`` over the data-parallel submesh per block and at the root (in place)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)
    mesh = mesh or mesh_for(engine)
    dp = mesh[LAYOUTS[engine][2]]
    tp = mesh["tp"]
    # the full sequence into the first block, this rank's tokens out of it; the final norm (not
    # tensor-parallel) gathers the sequence back
    parallelize_module(model.blocks[0], tp, PrepareModuleInput(
        input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True))
    parallelize_module(model.norm, tp, PrepareModuleInput(
        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))
    for block in model.blocks:
        parallelize_module(block, tp, {"norm": SequenceParallel(),
                                       "up": ColwiseParallel(input_layouts=Shard(1)),
                                       "down": RowwiseParallel(output_layouts=Shard(1))})
    for block in model.blocks:
        fully_shard(block, mesh=dp)
    fully_shard(model, mesh=dp)
    return model


def dp_coordinates(engine: str, mesh) -> tuple:
    """(dp_rank, dp_size): this rank's slice of the global batch (tp ranks share a slice)."""
    _, names, dp_names = LAYOUTS[engine]
    coord = dict(zip(names, mesh.get_coordinate()))
    rank, size = 0, 1
    for name in dp_names:
        n = mesh[name].size()
        rank, size = rank * n + coord[name], size * n
    return rank, size


# ---------------------------------------------------------------- measured on the ranks
MODES = ("one_pass", "two_pass")
RUN = dict(steps=5, switch_at=1, nan_at=3)   # few steps: the 8-rank module must stay cheap on 2 cores


def _replicas_ignored(params, pipeline_group=None):
    """The mesh's group, but every parameter counted as if no rank held a copy of it (replicas 1):
    what a back end that counts replicated parameters twice would reduce."""
    from sharded_msam_sf.backends.mesh_shares import mesh_shares
    group, replicas = mesh_shares(params, pipeline_group)
    return group, {k: 1 for k in replicas}


def _loop_args(engine: str) -> dict:
    dp_rank, dp_size = dp_coordinates(engine, mesh_for(engine))
    return dict(dp_rank=dp_rank, dp_size=dp_size, make=make_model, wrapper=wrap)


def measure_one(engine: str, mode: str, rank: int, world_size: int, **kw) -> dict:
    """``sharded_common.measure_equivalence`` for this model, its wrapping and its data slices."""
    return C.measure_equivalence(engine, mode, rank, world_size, **dict(RUN, **kw), **_loop_args(engine))


def measure_layout(engine: str, rank: int, world_size: int) -> dict:
    """Everything the TP test modules assert, measured once per rank: per mode the equivalence
    with the single-process control (no extra optimizer arguments), the same run with replicas
    ignored (must fail the checks), the collectives per step, and the back end's group and
    replica count per parameter."""
    from unittest import mock

    from sharded_msam_sf.backends import fsdp2

    out = {mode: measure_one(engine, mode, rank, world_size) for mode in MODES}
    with mock.patch.object(fsdp2, "mesh_shares", _replicas_ignored):
        out["counted_twice"] = measure_one(engine, "one_pass", rank, world_size, steps=3, nan_at=None)
    out["collectives"] = C.measure_collectives(engine, rank, world_size, steps=2, **_loop_args(engine))
    out["shares"] = shares_by_name(wrap(engine, make_model()))
    out["engine"] = engine
    return out


def shares_by_name(model) -> dict:
    """``{"group": ranks, "weighted": bool, name: replicas}`` of the back end the optimizer picks."""
    import torch.distributed as dist
    backend = C.AdamWMSAMScheduleFree(model.parameters()).backend
    out = {n: backend.share(p).replicas for n, p in model.named_parameters()}
    out.update(group=dist.get_process_group_ranks(backend.process_group), weighted=backend.reduction.weighted,
               backend=type(backend).__name__)
    return out


def _expected_replicas(engine: str, name: str) -> int:
    """The ranks holding each element: the data-parallel replicate dim (HSDP) × tp unless sharded over tp."""
    shape, names, _ = LAYOUTS[engine]
    sizes = dict(zip(names, shape))
    over_tp = name.endswith(("up.weight", "up.bias", "down.weight"))   # Colwise weight and bias, Rowwise weight
    return sizes.get("replicate", 1) * (1 if over_tp else sizes["tp"])


def check_shares(engine: str, shares: dict, group=None) -> None:
    """The optimizer's back end sums over ``group`` (default: all ranks of the mesh), weighted,
    dividing each parameter's local sum by :func:`_expected_replicas`."""
    shape, _, _ = LAYOUTS[engine]
    assert shares["backend"] == "FSDP2Backend" and shares["weighted"], shares
    assert shares["group"] == (group or list(range(math.prod(shape)))), shares["group"]
    names = [n for n in shares if n not in ("group", "weighted", "backend")]
    assert len(names) == 20, names
    for n in names:
        assert shares[n] == _expected_replicas(engine, n), (n, shares[n], _expected_replicas(engine, n))


# ---------------------------------------------------------------- the tests every layout module imports
# (each module defines the ``runs`` fixture: {rank: measure_layout(...) + its own measurements})
@pytest.mark.parametrize("check", C.EQUIVALENCE_CHECKS)
@pytest.mark.parametrize("mode", MODES)
def test_equals_single_process(runs, mode, check):
    C.assert_on_every_rank(runs, mode, C.EQUIVALENCE_CHECKS[check])
    if check == "final_weights":
        print(f"MAXDIFF {runs[0]['engine']} {mode} {max(r[mode]['diff'] for r in runs.values()):.3e}")


@pytest.mark.parametrize("check", ("global_norm", "ascent_scales"))
def test_replicas_counted_twice_would_fail(runs, check):
    # the same run with every parameter's replica count set to 1: the replicated ones (LayerNorms,
    # the Rowwise biases, the layers that are not tensor-parallel) count once per rank holding them
    for rank, r in runs.items():
        with pytest.raises(AssertionError):
            C.EQUIVALENCE_CHECKS[check](r["counted_twice"])
    r = runs[0]["counted_twice"]
    print(f"COUNTED_TWICE {runs[0]['engine']} norm {r['norm']:.4f} vs {r['ref_norm']:.4f}, "
          f"max |diff| weights {max(x['counted_twice']['diff'] for x in runs.values()):.3e}")


def test_every_parameter_counted_once_over_all_ranks(runs):
    # no flattened group over the dims that shard something: the sum spans all ranks of the mesh
    for rank, r in runs.items():
        check_shares(r["engine"], r["shares"])


@pytest.mark.parametrize("mode", MODES)
def test_one_all_reduce_per_gradient_and_none_in_train_eval(runs, mode):
    per_step = {"one_pass": 1, "two_pass": 2}[mode]
    C.assert_on_every_rank(runs, "collectives", lambda m: C.check_collectives(m[mode], per_step=per_step))
