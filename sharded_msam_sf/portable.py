"""The engine-neutral optimizer checkpoint ("portable"): a run's whole state by fully-qualified name.

A portable checkpoint is a flat map of tensors plus one JSON header:

=====================  ==================================================================
key                    value
=====================  ==================================================================
``y/<fqn>``            the parameter at y (the training point without the ascent), full shape
``z/<fqn>``            z (the base sequence)
``v/<fqn>``            v (``exp_avg_sq``)
``m/<fqn>``            m (``exp_avg``, the MSAM momentum), where the param has one
``buffer/<fqn>``       the model's buffers (BatchNorm running statistics, ...)
``header`` (JSON)      ``{"format": "sharded_msam_sf.portable", "version": 1, "groups": [...]}``: per
                       param group its hyperparameters, its counters (``k``, ``weight_sum``, ``lr_max``,
                       ``scheduled_lr``, ``ascent_scale`` in force, ``train_mode``, ``at_ascent``, ...)
                       and ``params``, the fqns in the group's order
=====================  ==================================================================

The params are stored as y whatever mode the optimizer was in (ALGORITHM.md): in eval mode the param
holds x and ``y = β1·x + (1 − β1)·z``; at the one_pass ascent it holds ``y + s·m`` and ``y = p − s·m`` (s
the group's ``ascent_scale``). Loading rebuilds the param of the saved mode from y with the optimizer's own
operations (``lerp(y, z, 1 − 1/β1)``, ``y + s·m``), so a resumed run continues the saved one to float
round-off (one lerp; measured in docs/checkpoints.md).

Two containers: one ``safetensors`` file (:func:`save_file` / :func:`load_file`; the header in the
file's metadata), for models that fit one host; and a ``torch.distributed.checkpoint`` directory
(:func:`save_dcp` / :func:`load_dcp`), written from a live sharded run with each rank writing only its
shards (FSDP2/TP DTensors stay DTensors) and read back into any layout (DCP reshards), the header stored
as the entry ``header``. The live side works through torch's ``get_state_dict``/``set_state_dict``, so one
code path serves one process, DDP, FSDP1, FSDP2 and FSDP2 + TP (:func:`from_optimizer`, :func:`to_optimizer`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["FORMAT", "VERSION", "Portable", "PortableError", "from_optimizer", "to_optimizer", "save_file",
           "load_file", "save_dcp", "load_dcp", "is_portable_file", "is_portable_dcp"]

FORMAT, VERSION = "sharded_msam_sf.portable", 1
_STATE = {"z": "z", "v": "exp_avg_sq", "m": "exp_avg"}   # portable prefix -> the optimizer's state key
_REQUIRED_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "sam_mode", "rho", "k", "weight_sum", "lr_max",
                        "train_mode", "at_ascent", "ascent_scale", "params")


class PortableError(ValueError):
    """A portable checkpoint that cannot be read or does not fit the model/optimizer (nothing was changed)."""


@dataclass
class Portable:
    tensors: Dict[str, Tensor]
    groups: List[Dict[str, Any]]
    extra: Dict[str, Any] = field(default_factory=dict)

    def header(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "groups": self.groups, "extra": self.extra},
                          sort_keys=True)

    @property
    def names(self) -> List[str]:
        return [n for g in self.groups for n in g["params"]]

    def check(self, where: str) -> None:
        """Every param of every group has y, z, v (and m where a sibling has it); no tensor without a param."""
        names = self.names
        if len(set(names)) != len(names):
            raise PortableError(f"{where}: a parameter is listed in more than one group")
        for i, g in enumerate(self.groups):
            missing = [k for k in _REQUIRED_GROUP_KEYS if k not in g]
            if missing:
                raise PortableError(f"{where}: group {i} lacks {missing}: not a checkpoint of AdamWMSAMScheduleFree")
        known = set(names)
        for key in self.tensors:
            kind, _, name = key.partition("/")
            if kind == "buffer":
                continue
            if kind not in ("y",) + tuple(_STATE) or name not in known:
                raise PortableError(f"{where}: tensor {key!r} belongs to no parameter of the header")
        for n in names:
            if f"y/{n}" not in self.tensors:
                raise PortableError(f"{where}: parameter {n!r} has no 'y' tensor")
            if (f"z/{n}" in self.tensors) != (f"v/{n}" in self.tensors):
                raise PortableError(f"{where}: parameter {n!r} has one of z and v without the other")
            t = self.tensors[f"y/{n}"]
            for kind in _STATE:
                s = self.tensors.get(f"{kind}/{n}")
                if s is not None and tuple(s.shape) != tuple(t.shape):
                    raise PortableError(f"{where}: {kind}/{n} has shape {tuple(s.shape)}, y/{n} {tuple(t.shape)}")


def _parse_header(text: Any, where: str) -> Dict[str, Any]:
    if isinstance(text, bytes):
        text = text.decode()
    try:
        head = json.loads(text)
    except (TypeError, ValueError) as e:
        raise PortableError(f"{where}: the header is not JSON ({e})") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise PortableError(f"{where}: not a portable checkpoint of sharded_msam_sf (format "
                            f"{head.get('format') if isinstance(head, dict) else None!r})")
    if head.get("version") != VERSION:
        raise PortableError(f"{where}: portable format version {head.get('version')}, this reads {VERSION}")
    return head


# ---------------------------------------------------------------------- group values <-> JSON
def _jsonable(key: str, v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.item()
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, float) and not math.isfinite(v):
        raise PortableError(f"param group value {key!r} = {v} is not finite")
    return v


def _from_json(key: str, v: Any) -> Any:
    if key == "betas":
        return tuple(v)
    if key == "state_dtype" and isinstance(v, str):
        return getattr(torch, v.replace("torch.", ""))
    return v


# ---------------------------------------------------------------------- y <-> the param of the saved mode
def _beta1(g: Dict[str, Any]) -> float:
    return float(g["betas"][0])


def _to_y(p: Tensor, st: Dict[str, Tensor], g: Dict[str, Any]) -> Tensor:
    p = p.detach()
    if "z" not in st:
        return p.clone()
    if not g["train_mode"]:                    # p = x: y = β1·x + (1 − β1)·z
        return p.lerp(st["z"].to(p.dtype), 1.0 - _beta1(g))
    if g["at_ascent"] and "exp_avg" in st:     # p = y + s·m
        return p - g["ascent_scale"] * st["exp_avg"].to(p.dtype)
    return p.clone()


def _from_y(y: Tensor, st: Dict[str, Tensor], g: Dict[str, Any]) -> Tensor:
    if "z" not in st:
        return y.clone()
    if not g["train_mode"]:                    # what eval() does: p.lerp_(z, 1 − 1/β1)
        return y.lerp(st["z"].to(y.dtype), 1.0 - 1.0 / _beta1(g))
    if g["at_ascent"] and "exp_avg" in st:
        return y + g["ascent_scale"] * st["exp_avg"].to(y.dtype)
    return y.clone()


# ---------------------------------------------------------------------- live optimizer <-> portable
def _options(full: bool, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # no cpu_offload: with full_state_dict it leaves the state on rank 0 only; every rank needs it here
    return StateDictOptions(full_state_dict=full, cpu_offload=False, strict=strict)


def _ours(optimizer: Any) -> Any:
    from .optimizer import AdamWMSAMScheduleFree
    inner = optimizer
    for _ in range(4):
        if isinstance(inner, AdamWMSAMScheduleFree):
            return inner
        inner = getattr(inner, "optimizer", None)
    raise PortableError(f"portable checkpoints hold AdamWMSAMScheduleFree's state, got {type(optimizer).__name__}")


def from_optimizer(model: torch.nn.Module, optimizer: Any, *, full: bool = True) -> Portable:
    """The portable checkpoint of a live run (one process, DDP, FSDP1, FSDP2, FSDP2 + TP). ``full``: full
    tensors on every rank, on the CPU (for :func:`save_file`); False: each rank's shards as the engine
    holds them (DTensors under FSDP2/TP, for :func:`save_dcp`). Collective under a sharded engine."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    _ours(optimizer)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(full))
    groups, tensors = [], {}
    params = set()
    for g in optim_sd["param_groups"]:
        names = list(g["params"])
        params.update(names)
        for n in names:
            if n not in model_sd:
                raise PortableError(f"the optimizer's parameter {n!r} is not in the model's state_dict")
            st = optim_sd["state"].get(n, {})
            tensors[f"y/{n}"] = _to_y(model_sd[n], st, g)
            for kind, key in _STATE.items():
                if key in st:
                    tensors[f"{kind}/{n}"] = st[key].detach().clone()
        groups.append({k: _jsonable(k, v) for k, v in g.items() if k != "params"} | {"params": names})
    for n, t in model_sd.items():
        if n not in params and isinstance(t, Tensor):
            tensors[f"buffer/{n}"] = t.detach().clone()
    if full:
        tensors = {k: v.to("cpu") for k, v in tensors.items()}
    out = Portable(tensors, groups)
    out.check("from_optimizer")
    return out


def _check_fits(p: Portable, model_sd: Dict[str, Any], optim_sd: Dict[str, Any], where: str) -> None:
    """Names, group layout, mode, rho and shapes of ``p`` against the live run (before anything is changed)."""
    live = [list(g["params"]) for g in optim_sd["param_groups"]]
    saved = [list(g["params"]) for g in p.groups]
    if len(live) != len(saved):
        raise PortableError(f"{where}: {len(saved)} param groups saved, the optimizer has {len(live)}")
    for i, (a, b) in enumerate(zip(saved, live)):
        if set(a) != set(b):
            raise PortableError(f"{where}: param group {i}: names differ: only in the checkpoint "
                                f"{sorted(set(a) - set(b))[:5]}, only in the model {sorted(set(b) - set(a))[:5]}")
    for i, (sg, lg) in enumerate(zip(p.groups, optim_sd["param_groups"])):
        for key in ("sam_mode", "rho", "state_dtype"):
            if key in lg and _from_json(key, sg.get(key)) != lg[key]:
                raise PortableError(f"{where}: param group {i} was saved with {key}={sg.get(key)!r}, the optimizer "
                                    f"has {lg[key]!r}: build it with the saved value to resume")
    for n in (n for g in saved for n in g):
        shape = tuple(p.tensors[f"y/{n}"].shape)
        live_shape = tuple(model_sd[n].shape)
        if shape != live_shape:
            raise PortableError(f"{where}: {n!r} has shape {shape} in the checkpoint, {live_shape} in the model")
    buffers = {k.partition("/")[2] for k in p.tensors if k.startswith("buffer/")}
    live_buffers = {k for k in model_sd if k not in {n for g in live for n in g}}
    if buffers != live_buffers:
        raise PortableError(f"{where}: buffers differ: only in the checkpoint {sorted(buffers - live_buffers)[:5]}, "
                            f"only in the model {sorted(live_buffers - buffers)[:5]}")


def to_optimizer(p: Portable, model: torch.nn.Module, optimizer: Any, *, full: bool = True) -> None:
    """Load ``p`` into a live run (any torch engine and world size): the params of the saved mode rebuilt
    from y, z/v/m, the counters and hyperparameters of every group, the buffers. ``full``: ``p`` holds full
    tensors (every rank the same); False: ``p`` holds this rank's shards (from :func:`load_dcp` with this run
    as the template). Checked first (a :class:`PortableError`, nothing changed)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    ours = _ours(optimizer)
    p.check("portable checkpoint")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(full))
    _check_fits(p, model_sd, optim_sd, "portable checkpoint")
    state: Dict[str, Dict[str, Tensor]] = {}
    groups = []
    new_model = dict(model_sd)
    for g in p.groups:
        hyper = {k: _from_json(k, v) for k, v in g.items() if k != "params"}
        groups.append(dict(hyper, params=list(g["params"])))
        for n in g["params"]:
            st = {key: p.tensors[f"{kind}/{n}"] for kind, key in _STATE.items() if f"{kind}/{n}" in p.tensors}
            if st:
                state[n] = st
            new_model[n] = _from_y(p.tensors[f"y/{n}"], st, hyper)
    for k in list(new_model):
        if f"buffer/{k}" in p.tensors:
            new_model[k] = p.tensors[f"buffer/{k}"]
    set_state_dict(model, optimizer, model_state_dict=new_model,
                   optim_state_dict={"state": state, "param_groups": groups}, options=_options(full))
    ours._backend.params_changed()


# ---------------------------------------------------------------------- containers
def is_portable_file(path: os.PathLike | str) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            return f'"format": "{FORMAT}"' in (f.metadata() or {}).get("header", "")
    except Exception:  # not a safetensors file at all
        return False


def is_portable_dcp(path: os.PathLike | str) -> bool:
    path = Path(path)
    if not (path / ".metadata").is_file():
        return False
    from torch.distributed.checkpoint import FileSystemReader
    try:
        return "header" in FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception:
        return False


def save_file(p: Portable, path: os.PathLike | str) -> Path:
    """One ``safetensors`` file (full tensors, contiguous, CPU); the header in its metadata."""
    from safetensors.torch import save_file as st_save
    p.check("save_file")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(p.tensors.items())}
    # one metadata entry: safetensors writes the metadata map in hash order, so two entries could swap
    st_save(tensors, str(path), metadata={"header": p.header()})
    return Path(path)


def load_file(path: os.PathLike | str) -> Portable:
    """Read a :func:`save_file` file (a truncated or foreign file: :class:`PortableError`)."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if "header" not in meta:
                raise PortableError(f"{path}: a safetensors file, but not a portable checkpoint of sharded_msam_sf "
                                    "(no 'header' metadata): a model-weights file?")
            head = _parse_header(meta["header"], str(path))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise PortableError(f"{path}: unreadable safetensors file (truncated or not safetensors): {e}") from None
    except OSError as e:
        raise PortableError(f"{path}: {e}") from None
    out = Portable(tensors, head["groups"], head.get("extra", {}))
    out.check(str(path))
    return out


def save_dcp(p: Portable, path: os.PathLike | str) -> Path:
    """A ``torch.distributed.checkpoint`` directory: collective when a process group is up (each rank writes
    its shards of DTensor entries, rank 0 the replicated ones), a plain write otherwise."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    p.check("save_dcp")
    sd: Dict[str, Any] = dict(sorted(p.tensors.items()))
    sd["header"] = p.header()
    dcp.save(sd, storage_writer=_writer(path), no_dist=not (dist.is_available() and dist.is_initialized()))
    return Path(path)


def _writer(path: os.PathLike | str):
    """DCP's file writer without the ``StorageMeta`` (the checkpoint's path and a random save id) in
    ``.metadata``: the same checkpoint written twice is then the same bytes."""
    from torch.distributed.checkpoint import FileSystemWriter

    class _Deterministic(FileSystemWriter):
        def storage_meta(self):
            return None
    return _Deterministic(str(path))


def load_dcp(path: os.PathLike | str, template: Optional[Portable] = None) -> Portable:
    """Read a :func:`save_dcp` directory: with ``template`` (e.g. :func:`from_optimizer` of the live run with
    ``full=False``) each rank reads only its shards into the template's tensors (collective); without, the
    full tensors in this process."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    path = Path(path)
    if not is_portable_dcp(path):
        raise PortableError(f"{path}: not a portable DCP checkpoint of sharded_msam_sf (no readable .metadata with "
                            "a 'header' entry)")
    no_dist = not (dist.is_available() and dist.is_initialized())
    try:
        if template is None:  # full tensors, shaped from the checkpoint's own metadata
            from torch.distributed.checkpoint import FileSystemReader
            from torch.distributed.checkpoint.metadata import TensorStorageMetadata
            meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
            sd: Dict[str, Any] = {k: torch.empty(m.size, dtype=m.properties.dtype)
                                  if isinstance(m, TensorStorageMetadata) else "" for k, m in meta.items()}
            dcp.load(sd, checkpoint_id=str(path), no_dist=True)
        else:
            sd = dict(template.tensors)
            sd["header"] = ""
            dcp.load(sd, checkpoint_id=str(path), no_dist=no_dist)
    except Exception as e:  # a missing/truncated shard file, a key the checkpoint lacks
        raise PortableError(f"{path}: cannot read the DCP checkpoint ({type(e).__name__}: {e})") from None
    head = _parse_header(sd.pop("header"), str(path))
    out = Portable({k: v for k, v in sd.items()}, head["groups"], head.get("extra", {}))
    out.check(str(path))
    return out
