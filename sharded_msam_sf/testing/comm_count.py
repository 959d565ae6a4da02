"""Count the collectives a piece of code issues: calls and bytes per kind.

::

    from sharded_msam_sf.testing.comm_count import CommCounter
    with CommCounter() as cc:          # enter it before deepspeed.initialize: DeepSpeed keeps
        engine.step()                  # references to some torch.distributed functions
    print(cc.summary())                # {"all_reduce": {"calls": 1, "bytes": 24}, ...}

The counter wraps the ``torch.distributed`` collectives (module attributes and
``distributed_c10d``), and the references DeepSpeed's comm backend caches at init
(``all_gather_function``, ``reduce_scatter_function``), for as long as it is active.
Bytes are those of the tensor(s) this rank passes in (the output for all-gather-type
calls: what a rank receives). ``reset()`` starts a new count; ``counting=False`` pauses.
Nested calls (a DeepSpeed wrapper calling a torch one) are counted once, at the outermost.

Every counted call is also recorded in ``records`` as a :class:`Call` (kind, shape of the
counted tensor, bytes, ``group_size`` (ranks of its process group), and ``ours``: issued from code of this package, i.e. a frame of
``sharded_msam_sf`` is on the stack — the optimizer's own all-reduce — rather than by the
engine alone). ``ours()`` lists those: the tests assert there is exactly one per gradient
evaluation, an all-reduce of ``G + 1`` float64.
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["CommCounter", "Call", "COLLECTIVES"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGE = os.path.dirname(_HERE) + os.sep  # sharded_msam_sf/ (this file is in sharded_msam_sf/testing/)
# frames that are not the package acting: this counter, and the rank harness every rank starts in
_NOT_OURS = {os.path.join(_HERE, "comm_count.py"), os.path.join(_HERE, "local_ranks.py")}

# name -> index of the argument whose size is counted (the received tensor for gathers)
COLLECTIVES: Dict[str, Tuple[int, str]] = {
    "all_reduce": (0, "tensor"),
    "all_reduce_coalesced": (0, "tensors"),
    "reduce": (0, "tensor"),
    "broadcast": (0, "tensor"),
    "all_gather": (0, "tensor_list"),
    "all_gather_into_tensor": (0, "output_tensor"),
    "_all_gather_base": (0, "output_tensor"),
    "all_gather_single": (0, "output_tensor"),      # torch >= 2.13's names, used by FSDP2
    "reduce_scatter_single": (1, "input"),
    "all_gather_coalesced": (0, "output_tensor_lists"),
    "reduce_scatter": (1, "input_list"),
    "reduce_scatter_tensor": (1, "input"),
    "_reduce_scatter_base": (1, "input"),
    "all_to_all": (1, "input_tensor_list"),
    "all_to_all_single": (1, "input"),
    "gather": (0, "tensor"),
    "scatter": (0, "tensor"),
    "barrier": (-1, ""),
    "send": (0, "tensor"),
    "recv": (0, "tensor"),
    "isend": (0, "tensor"),
    "irecv": (0, "tensor"),
    "batch_isend_irecv": (-1, ""),
    "all_gather_object": (-1, ""),
    "broadcast_object_list": (-1, ""),
}


@dataclass(frozen=True)
class Call:
    """One counted collective."""

    name: str
    shape: Optional[Tuple[int, ...]]  # of the counted tensor (None for lists and objects)
    bytes: int
    ours: bool  # issued from inside the sharded_msam_sf package
    group_size: Optional[int] = None  # ranks of the call's process group (None: not known)


def _from_package(frame) -> bool:
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_PACKAGE) and name not in _NOT_OURS:
            return True
        frame = frame.f_back
    return False


def _group_size(sig: Optional[inspect.Signature], args: tuple, kwargs: dict) -> Optional[int]:
    """Ranks of the ``group`` argument of a collective call (WORLD when not given)."""
    if sig is None or "group" not in sig.parameters:
        return None
    try:
        group = sig.bind_partial(*args, **kwargs).arguments.get("group")
        return dist.get_world_size(group) if group is not None else dist.get_world_size()
    except Exception:  # noqa: BLE001 - a group this rank is not in, a DeepSpeed wrapper's own object
        return None


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


class CommCounter:
    """Counts torch.distributed collectives (calls and bytes per kind) while active."""

    def __init__(self) -> None:
        self.calls: Dict[str, int] = defaultdict(int)
        self.bytes: Dict[str, int] = defaultdict(int)
        self.counting = True
        self.records: List[Call] = []
        self._saved: List[Tuple[Any, str, Callable]] = []
        self._wrappers: Dict[int, Callable] = {}
        self._local = threading.local()

    # ------------------------------------------------------------------ counting
    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.records.clear()

    def ours(self) -> List[Call]:
        """The counted calls issued from inside this package (see the module docstring)."""
        return [c for c in self.records if c.ours]

    def summary(self) -> Dict[str, Dict[str, int]]:
        return {k: {"calls": self.calls[k], "bytes": self.bytes[k]} for k in sorted(self.calls)}

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def _wrap(self, name: str, fn: Callable) -> Callable:
        index, keyword = COLLECTIVES[name]
        counter = self
        try:
            sig: Optional[inspect.Signature] = inspect.signature(fn)
        except (TypeError, ValueError):
            sig = None

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            depth = getattr(counter._local, "depth", 0)
            if depth == 0 and counter.counting:
                arg = args[index] if 0 <= index < len(args) else kwargs.get(keyword)
                n = _nbytes(arg)
                counter.calls[name] += 1
                counter.bytes[name] += n
                counter.records.append(Call(name, tuple(arg.shape) if isinstance(arg, torch.Tensor) else None, n,
                                            _from_package(sys._getframe(1)), _group_size(sig, args, kwargs)))
            counter._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter._local.depth = depth

        wrapper.__comm_count_original__ = fn
        return wrapper

    def _patch(self, obj: Any, attr: str, name: str) -> None:
        fn = getattr(obj, attr, None)
        if fn is None or not callable(fn):
            return
        self._saved.append((obj, attr, fn))
        original = getattr(fn, "__comm_count_original__", fn)
        # one wrapper per function, wherever it is reached from: torch compares them (P2POp's op must
        # be torch.distributed.isend / irecv, checked against distributed_c10d's own)
        if id(original) not in self._wrappers:
            self._wrappers[id(original)] = self._wrap(name, original)
        setattr(obj, attr, self._wrappers[id(original)])

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "CommCounter":
        from torch.distributed import distributed_c10d as c10d
        originals: Dict[int, str] = {}
        for name in COLLECTIVES:
            for mod in (dist, c10d):
                fn = getattr(mod, name, None)
                if fn is not None:
                    originals[id(fn)] = name
                    self._patch(mod, name, name)
        try:  # DeepSpeed's comm backend keeps references taken at init
            from deepspeed.comm import comm as ds_comm
            cdb = getattr(ds_comm, "cdb", None)
            for attr in ("all_gather_function", "reduce_scatter_function"):
                fn = getattr(cdb, attr, None) if cdb is not None else None
                base = getattr(fn, "__comm_count_original__", fn)
                if fn is not None and id(base) in originals:
                    self._patch(cdb, attr, originals[id(base)])
        except ImportError:
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for obj, attr, fn in reversed(self._saved):
            setattr(obj, attr, fn)
        self._saved.clear()
        self._wrappers.clear()
