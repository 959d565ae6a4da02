"""Tensors without data — meta tensors and ``FakeTensorMode`` fakes — for dry runs at scale.

A dry run (``python -m sharded_msam_sf.simulate``, the job's ``--dry-run --simulate-world N``,
torchtitan-style memory estimation) builds the model on the meta device or under torch's
``FakeTensorMode`` and runs one rank of an N-rank job on the fake process group: shapes, state
sizes and the collectives issued are real, values are not. Three rules make the optimizer run
there, and change nothing for tensors that hold data:

- :func:`is_abstract`: a meta tensor, a ``FakeTensor``, or a DTensor whose local shard is one.
  The kernels send such tensors down the eager path (a C++ or compiled kernel would read
  memory that was never allocated).
- :func:`host_values`: the optimizer's one device-to-host read of the reduced statistics
  ``[sumsq_0, …, sumsq_{G−1}, flag]`` returns the placeholder :data:`PLACEHOLDER_SUMSQ` per
  group and a clean flag (0: no NaN, no overflow) for an abstract tensor, so that the ascent
  path runs with a finite, nonzero scale; a real tensor is read with ``tolist()`` as before.
- :func:`real_mode`: a context in which ``FakeTensorMode`` is off, for reading host-side
  metadata held in real tensors (a ``DeviceMesh``'s rank table) from inside a fake mode.

Meta *parameters* are refused by the optimizer unless a dry run asks for them
(:func:`allow_meta_params`): a meta param in a real run is a model someone forgot to
materialise, and stepping it would silently do nothing.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List

from torch import Tensor

__all__ = ["PLACEHOLDER_SUMSQ", "is_abstract", "host_values", "real_mode", "allow_meta_params",
           "meta_params_allowed"]

PLACEHOLDER_SUMSQ = 1.0  # per group: ||m|| = sqrt(G) > 0, so the ascent (s ≠ 0) is exercised

_state = threading.local()


def _is_fake(t: Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - torch without fake tensors
        return False
    return bool(is_fake(t))


def is_abstract(t: Tensor) -> bool:
    """Whether ``t`` holds no data: on the meta device, a FakeTensor, or a DTensor of either."""
    if t is None:
        return False
    local = getattr(t, "_local_tensor", None)  # DTensor: its shard decides
    if isinstance(local, Tensor):
        t = local
    return t.device.type == "meta" or _is_fake(t)


def host_values(stats: Tensor) -> List[float]:
    """``stats.tolist()``; for an abstract ``stats`` the placeholder per group and flag 0."""
    if is_abstract(stats):
        n = stats.numel()
        return [PLACEHOLDER_SUMSQ] * (n - 1) + [0.0]
    return stats.tolist()


@contextlib.contextmanager
def real_mode() -> Iterator[None]:
    """``FakeTensorMode`` off inside (reading a real host tensor's values); a no-op outside one."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # pragma: no cover
        yield
        return
    with unset_fake_temporarily():
        yield


@contextlib.contextmanager
def allow_meta_params() -> Iterator[None]:
    """Inside: the optimizer creates (meta) state for meta-device parameters and steps them (a dry run)."""
    depth = getattr(_state, "meta", 0)
    _state.meta = depth + 1
    try:
        yield
    finally:
        _state.meta = depth


def meta_params_allowed() -> bool:
    return getattr(_state, "meta", 0) > 0
