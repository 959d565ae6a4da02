"""Where a model's parameters and data live, and the reductions that make every
measure equal to the single-process one.

Every measure in this package is a function of one objective,

    L(θ) = (1 / B) · Σ_b loss_fn(model, batch_b)

the mean of ``loss_fn`` over *all* batches on *all* ranks (each batch weighs the
same; use equal-sized batches to get the per-example mean). Three layouts:

- ``local``: a plain ``nn.Module`` on one process.
- ``ddp``: a ``DistributedDataParallel`` wrapper. The parameters are replicated, each
  rank holds its own batches. We run the wrapped ``.module`` (no reducer hooks, so
  double backward is allowed) and all-reduce the sums of losses / gradients / HVPs
  and the batch count over ``model.process_group``.
- ``fsdp2``: a model with ``fully_shard`` applied on a 1-D mesh. The parameters are
  ``DTensor`` shards (``Shard(0)``); forward and backward must run through the FSDP
  module (its hooks all-gather and reduce-scatter), so gradients come from
  ``backward()`` and every rank must hold the same number of batches (the
  all-gathers are collective). Dot products of parameter-shaped vectors are sums
  over the local shards, all-reduced over the mesh.

Parameter-shaped vectors are lists of *local* tensors (the whole tensor, or this
rank's shard), in the order of ``model.parameters()`` restricted to
``requires_grad``.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..backends import Backend, LocalBackend, engine_kind

LossFn = Callable[[nn.Module, object], torch.Tensor]


@dataclass
class Layout:
    """The resolved layout of a model (see the module docstring)."""

    kind: str  # "local" | "ddp" | "fsdp2": the rule of sharded_msam_sf.backends that applies
    model: nn.Module  # what the user passed; train/eval flags are set on it
    forward_module: nn.Module  # what loss_fn is called with
    params: list  # trainable parameters, model order
    group: object  # process group for data (and shard) reductions; None if local
    backend: Backend  # the optimizer's back end for these params: local shards, stale-parameter resets

    @property
    def distributed(self) -> bool:
        return self.group is not None

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp2"

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.distributed else 0

    def local(self, p: torch.Tensor) -> torch.Tensor:
        """This rank's part of a parameter (or gradient): the shard for DTensors."""
        return self.backend.local(p)

    def local_params(self) -> list:
        return [self.local(p).detach() for p in self.params]

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def reshard(self) -> None:
        """FSDP2: drop any unsharded parameters so that the next forward all-gathers
        the (possibly edited) shards. A root left unsharded after forward would
        otherwise keep computing with stale full parameters (the back end's
        ``params_changed``; nothing to do for the other layouts)."""
        self.backend.params_changed()

    def log(self, msg: str, progress: bool) -> None:
        if progress and self.rank == 0:
            print(msg, file=sys.stderr, flush=True)


def resolve(model: nn.Module) -> Layout:
    """Classify ``model`` as local, DDP or FSDP2 (by :func:`sharded_msam_sf.backends.engine_kind`,
    the optimizer's own rule); raise for what is not supported."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    kind = engine_kind(list(model.parameters()), model=model)
    if kind == "ddp":
        params = [p for p in model.module.parameters() if p.requires_grad]
        layout = Layout("ddp", model, model.module, params, model.process_group, LocalBackend())
    elif kind == "fsdp2":
        from torch.distributed.tensor import Shard

        from ..backends.fsdp2 import FSDP2Backend, is_dtensor

        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if not is_dtensor(p):
                raise NotImplementedError(
                    "FSDP2 model with a parameter that is not a DTensor shard: apply "
                    "fully_shard to the root module so that every parameter is sharded"
                )
            if p.device_mesh.ndim != 1:
                raise NotImplementedError(
                    "FSDP2 on a 2-D (HSDP) mesh is not supported by the analysis "
                    "functions: only a 1-D shard mesh"
                )
            if tuple(p.placements) != (Shard(0),):
                raise NotImplementedError(
                    f"FSDP2 parameter placement {tuple(p.placements)} is not supported: "
                    "filter normalization needs dim-0 sharding, Shard(0) (the default)"
                )
        backend = FSDP2Backend(list(model.parameters()), model=model)
        layout = Layout("fsdp2", model, model, params, backend.process_group, backend)
    elif kind in ("fsdp1", "deepspeed"):
        raise NotImplementedError(
            f"{'FSDP1 (FullyShardedDataParallel)' if kind == 'fsdp1' else 'DeepSpeed ZeRO-3'} models are not "
            "supported by the analysis functions; use FSDP2 (fully_shard), DDP, or a full copy of the model"
        )
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        layout = Layout("local", model, model, params, None, LocalBackend())
    if not layout.params:
        raise ValueError("model has no parameters with requires_grad=True")
    return layout


def check_batches(batches: Sequence, name: str = "batches") -> Sequence:
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise ValueError(f"{name} must be a sequence of batches, got {type(batches).__name__}")
    batches = list(batches)
    return batches


def global_batch_count(layout: Layout, batches: Sequence) -> int:
    """Total number of batches over all ranks; for FSDP2 every rank must hold the
    same number (its forward passes are collective)."""
    n = len(batches)
    if not layout.distributed:
        if n == 0:
            raise ValueError("batches is empty: at least one batch is needed")
        return n
    t = torch.tensor([n, -n], dtype=torch.float64, device=_comm_device(layout))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=layout.group)
    n_max, n_min = int(t[0].item()), int(-t[1].item())
    if layout.sharded and n_max != n_min:
        raise ValueError(
            f"batches: FSDP2 needs the same number of batches on every rank, got "
            f"between {n_min} and {n_max}"
        )
    total = torch.tensor([float(n)], dtype=torch.float64, device=_comm_device(layout))
    layout.all_reduce_(total)
    if total.item() == 0:
        raise ValueError("batches is empty on every rank: at least one batch is needed")
    return int(total.item())


def _comm_device(layout: Layout) -> torch.device:
    backend = dist.get_backend(layout.group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def measuring(layout: Layout, eval_mode: bool):
    """Put the model in eval mode (dropout off, batch-norm running statistics) for
    the measurement and restore every module's training flag afterwards."""
    flags = [(m, m.training) for m in layout.model.modules()]
    if eval_mode:
        layout.model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        layout.reshard()


def dot(layout: Layout, a: list, b: list) -> float:
    """Global inner product of two parameter-shaped vectors (float64 accumulation)."""
    s = torch.zeros((), dtype=torch.float64, device=a[0].device if a else "cpu")
    for x, y in zip(a, b):
        s += (x.double() * y.double()).sum().to(s.device)
    if layout.sharded:
        s = s.to(_comm_device(layout))
        layout.all_reduce_(s)
    return float(s.item())


def norm(layout: Layout, a: list) -> float:
    return dot(layout, a, a) ** 0.5


def mean_loss(layout: Layout, loss_fn: LossFn, batches: Sequence) -> float:
    """L(θ) at the current parameters (no gradients)."""
    count = global_batch_count(layout, batches)
    s = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for b in batches:
            s += _scalar(loss_fn(layout.forward_module, b)).detach().double().cpu()
    layout.reshard()
    if layout.distributed:
        s = s.to(_comm_device(layout))
        layout.all_reduce_(s)
    return float(s.item()) / count


def _scalar(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            "loss_fn must return a scalar tensor (the mean loss of the batch), got "
            f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}"
        )
    return loss.reshape(())


def _all_reduce_list_(layout: Layout, tensors: list) -> None:
    """Sum a list of local tensors over the data group with one all-reduce."""
    if not layout.distributed:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(_comm_device(layout))
    layout.all_reduce_(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def mean_grad(layout: Layout, loss_fn: LossFn, batches: Sequence) -> tuple:
    """(L(θ), ∇L(θ)) — the gradient as a list of local tensors. Leaves every
    parameter's ``.grad`` as it found it."""
    count = global_batch_count(layout, batches)
    with torch.enable_grad():  # also when called under torch.no_grad()
        if layout.kind == "fsdp2":
            return _mean_grad_fsdp2(layout, loss_fn, batches, count)
        return _mean_grad_local(layout, loss_fn, batches, count)


def _mean_grad_local(layout: Layout, loss_fn: LossFn, batches: Sequence, count: int) -> tuple:
    grads = [torch.zeros_like(p) for p in layout.params]
    s = torch.zeros((), dtype=torch.float64)
    for b in batches:
        loss = _scalar(loss_fn(layout.forward_module, b))
        gs = torch.autograd.grad(loss, layout.params, allow_unused=True)
        for acc, g in zip(grads, gs):
            if g is not None:
                acc.add_(g.detach())
        s += loss.detach().double().cpu()
    _all_reduce_list_(layout, grads)
    if layout.distributed:
        s2 = s.to(_comm_device(layout))
        layout.all_reduce_(s2)
        s = s2
    for g in grads:
        g.div_(count)
    return float(s.item()) / count, grads


def _mean_grad_fsdp2(layout: Layout, loss_fn: LossFn, batches: Sequence, count: int) -> tuple:
    saved = [p.grad for p in layout.params]
    n_local = len(batches)
    try:
        for p in layout.params:
            p.grad = None
        s = torch.zeros((), dtype=torch.float64)
        for b in batches:
            loss = _scalar(loss_fn(layout.forward_module, b))
            # FSDP2 averages gradients over the mesh in reduce-scatter (÷ world);
            # dividing by the local count gives the mean over all batches.
            (loss / n_local).backward()
            s += loss.detach().double().cpu()
        layout.reshard()
        grads = [
            layout.local(p.grad).detach().clone() if p.grad is not None
            else torch.zeros_like(layout.local(p)) for p in layout.params
        ]
    finally:
        for p, g in zip(layout.params, saved):
            p.grad = g
    s = s.to(_comm_device(layout))
    layout.all_reduce_(s)
    return float(s.item()) / count, grads


def _math_attention():
    """scaled_dot_product_attention on its math backend: the fused kernels (flash,
    memory-efficient, the CPU flash kernel) have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def hvp(layout: Layout, loss_fn: LossFn, batches: Sequence, vector: list) -> list:
    """∇²L(θ)·v by double backward (Pearlmutter's trick): ∇_θ (∇_θ L · v).
    Attention runs on the math SDPA backend here (see ``_math_attention``)."""
    if layout.kind == "fsdp2":
        raise NotImplementedError(
            "Hessian-vector products are not available for FSDP2 models: fully_shard "
            "computes parameter gradients in backward hooks (all-gather in forward, "
            "reduce-scatter after backward) outside the autograd graph of the sharded "
            "parameters, so the gradient cannot be differentiated again. Measure the "
            "Hessian on a full copy of the model (e.g. get_model_state_dict with "
            "full_state_dict=True loaded into an unsharded model, or DDP)."
        )
    count = global_batch_count(layout, batches)
    with torch.enable_grad():  # also when called under torch.no_grad()
        out = _hvp_sum(layout, loss_fn, batches, vector)
    _all_reduce_list_(layout, out)
    for h in out:
        h.div_(count)
    return out


def _hvp_sum(layout: Layout, loss_fn: LossFn, batches: Sequence, vector: list) -> list:
    out = [torch.zeros_like(p) for p in layout.params]
    for b in batches:
        with _math_attention():
            loss = _scalar(loss_fn(layout.forward_module, b))
        gs = torch.autograd.grad(loss, layout.params, create_graph=True, allow_unused=True)
        pairs = [(g, v) for g, v in zip(gs, vector) if g is not None]
        if not pairs:
            continue
        gv = sum((g * v).sum() for g, v in pairs)
        if not gv.requires_grad:  # the loss is linear in θ: the Hessian is zero
            continue
        hs = torch.autograd.grad(gv, layout.params, allow_unused=True)
        for acc, h in zip(out, hs):
            if h is not None:
                acc.add_(h.detach())
    return out
