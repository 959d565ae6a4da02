"""Random directions in parameter space, and the filter normalization of Li et al.
(2018, "Visualizing the Loss Landscape of Neural Nets").

A direction is a list of tensors shaped like the model's trainable parameters (on
FSDP2: this rank's ``Shard(0)`` part). The random draw is made for the *full*
tensor from one CPU generator seeded with ``seed`` — parameter by parameter, in
model order — so every rank, every layout and every device gets the same direction
and a sharded model is probed along exactly the direction the unsharded one is.

Filter normalization (Li et al., Sec. 4): draw d ~ N(0, I) and rescale every
filter of d to the norm of the matching filter of θ,

    d_{i,j} ← d_{i,j} / ||d_{i,j}|| · ||θ_{i,j}||

where a filter is one slice along dim 0 (an output row of a Linear weight, an
output channel of a convolution). Parameters with dim ≤ 1 (biases, norm scales)
get d = 0 by default (Li et al.'s ``ignore='biasbn'``), or d = θ with
``bias_bn="copy"`` (their alternative).
"""

from __future__ import annotations

import torch
from torch import nn

from ..backends import is_dtensor
from ._layout import Layout, resolve

_BIAS_BN = ("zero", "copy")


def random_direction(model: nn.Module, seed: int = 0) -> list:
    """d ~ N(0, I) with the shapes of the trainable parameters (local parts)."""
    return _random(resolve(model), seed)


def filter_normalized_direction(model: nn.Module, seed: int = 0, bias_bn: str = "zero") -> list:
    """A random direction with each dim-0 filter scaled to the norm of the weight's
    filter (see the module docstring). ``bias_bn``: "zero" (default) or "copy"."""
    return _filter_normalized(resolve(model), seed, bias_bn)


def _random(layout: Layout, seed: int) -> list:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    out = []
    for p in layout.params:
        full = torch.randn(tuple(p.shape), generator=gen, dtype=torch.float32)
        if is_dtensor(p):
            from torch.distributed.tensor import distribute_tensor

            # src_data_rank=None: every rank keeps its own slice of its own copy
            # (identical on every rank), no communication.
            local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
        else:
            local = full
        out.append(local.to(device=layout.local(p).device, dtype=p.dtype))
    return out


def _filter_normalized(layout: Layout, seed: int, bias_bn: str) -> list:
    if bias_bn not in _BIAS_BN:
        raise ValueError(f"bias_bn must be one of {_BIAS_BN}, got {bias_bn!r}")
    d = _random(layout, seed)
    for di, p in zip(d, layout.params):
        w = layout.local(p).detach()
        if p.dim() <= 1:
            if bias_bn == "zero":
                di.zero_()
            else:
                di.copy_(w)
            continue
        if di.numel() == 0:  # an FSDP2 rank holding no rows of this parameter
            continue
        dims = tuple(range(1, di.dim()))
        w_norm = torch.linalg.vector_norm(w.double(), dim=dims, keepdim=True)
        d_norm = torch.linalg.vector_norm(di.double(), dim=dims, keepdim=True)
        di.copy_((di.double() * (w_norm / (d_norm + 1e-10))).to(di.dtype))
    return d
