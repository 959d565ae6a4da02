"""Tensor parallelism for the job's GPT (``parallel.tp``, engine fsdp2), Megatron-style, built with
``torch.distributed.tensor.parallel`` on the ``tp`` dim of a dp × tp device mesh.

Per block (``parallelize_gpt``):

- attention ``q``, ``k``, ``v``: ``ColwiseParallel`` (each tp rank computes ``n_head / tp`` whole
  heads; the attention reads its head count from the local width), ``proj``: ``RowwiseParallel``
  (its output is summed over the tp ranks: one all-reduce);
- MLP ``fc``: ``ColwiseParallel``, ``proj``: ``RowwiseParallel`` (one all-reduce).

The embeddings, the LayerNorms and the (tied) head are not tensor-parallel: every tp rank holds
them whole (``fully_shard`` then shards them over dp only) and computes the same activations
between the blocks' parallel regions, whose input gradients ``ColwiseParallel`` sums over tp. So
a forward and backward costs 2 all-reduces of (batch × sequence × n_embd) activations per block
each way over the tp group, and every tp rank of one data-parallel replica must read the same
batch (the job's batches are indexed by the dp rank).

``clip_grad_norm_`` is the gradient clipping for this layout: the parameters live on two meshes
(dp × tp and dp), which ``torch.nn.utils.clip_grad_norm_`` cannot stack; the norm is taken as
the optimizer takes ‖m‖ (``sharded_msam_sf.backends.mesh_shares``): each parameter's local sum of
squares divided by the number of ranks holding a copy of it, one all-reduce over all ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["make_mesh", "parallelize_gpt", "clip_grad_norm_"]


def make_mesh(device_type: str, world_size: int, tp: int):
    """The dp × tp mesh; consecutive ranks form one tp group (one node's GPUs)."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))


def parallelize_gpt(model: nn.Module, tp_mesh) -> nn.Module:
    """Split every block's attention projections and MLP over ``tp_mesh`` (in place; see the module
    docstring). The head count must be a multiple of the tp size (the job's config checks it)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    tp = tp_mesh.size()
    n_head = model.cfg.n_head
    if n_head % tp:
        raise ValueError(f"tensor parallelism over {tp} ranks needs n_head ({n_head}) divisible by {tp}")
    plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(), "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel()}
    for block in model.blocks:
        parallelize_module(block, tp_mesh, plan)
    return model


@torch.no_grad()
def clip_grad_norm_(params, backend, max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global L2 norm is at most ``max_norm`` (factor
    ``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``); returns the norm.
    ``backend`` is the optimizer's (``optimizer.backend``): its ``local`` view and each parameter's
    replica count give ``norm² = Σ_ranks Σ_p sumsq(local grad_p) / replicas(p)``, one all-reduce
    over ``backend.process_group``."""
    grads = [(backend.local(p.grad), backend.share(p).replicas) for p in params if p.grad is not None]
    device = grads[0][0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g, replicas in grads:
        total += g.double().square().sum() / replicas
    if backend.process_group is not None:
        dist.all_reduce(total, group=backend.process_group)
    norm = total.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g, _ in grads:
        g.mul_(coef.to(g.dtype))
    return norm
