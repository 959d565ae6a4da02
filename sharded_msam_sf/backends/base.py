"""The contract between the optimizer and a sharding engine.

The optimizer (``optimizer.py``) does all the math through ``functional.py`` on
*local* tensors and asks its back end three things, never calling
``torch.distributed`` itself:

- ``local(t)``: the tensor this rank holds for ``t`` (a DTensor's local shard, a
  flat ZeRO partition, or ``t`` itself), which in-place math may write;
- ``all_reduce_(stats)``: SUM a small float64 tensor of per-group scalars (sums of
  squares of ``m`` and the non-finite-gradient flag) over the ranks that shard the
  state — the only collective the optimizer adds, once per gradient evaluation;
  replicas of the same shard (DDP, HSDP replicas) must not be counted twice;
- ``params_changed()``: make an out-of-step change of the params (train/eval swap,
  ascent, removal) visible to the next forward (e.g. drop stale unsharded
  FSDP2 params, push DeepSpeed fp32 masters to the bit16 weights).

``clear_grads(optimizer)`` is what ``move_to_ascent()`` uses to drop the first
gradient in two-pass mode; engines that own the gradient buffers override it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from ..optimizer import AdamWMSAMScheduleFree


class Backend:
    """Base back end: one process, or replicas that hold identical state (DDP)."""

    name = "local"

    def local(self, t: Tensor) -> Tensor:
        return t

    def all_reduce_(self, stats: Tensor) -> None:  # noqa: D401 - one process: already global
        """Sum ``stats`` over the shard group in place (nothing to do on one process)."""
        return None

    def params_changed(self) -> None:
        """Nothing caches the params outside the tensors themselves on one process."""
        return None

    def clear_grads(self, optimizer: "AdamWMSAMScheduleFree") -> None:
        optimizer.zero_grad(set_to_none=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
