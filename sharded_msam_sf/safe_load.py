"""Loaders that run no code from a checkpoint: what the offline tools and ``seal`` read files with.

- torch files (``*.pt``, DeepSpeed's ``*_model_states.pt`` / ``*_optim_states.pt``, the job's
  ``state.pt``): ``torch.load(weights_only=True)``, with the few DeepSpeed classes these files pickle
  allow-listed (:func:`sharded_msam_sf.deepspeed.universal.deepspeed_safe_globals`);
- DCP's ``.metadata`` (a plain pickle, which ``FileSystemReader.read_metadata`` unpickles with
  ``pickle.load``): :class:`DcpMetadataUnpickler`, which admits only torch's DCP metadata classes
  (``torch.distributed.checkpoint.metadata``, ``filesystem._StorageInfo``), ``torch.Size``, torch dtypes /
  layouts / memory formats and ``pathlib`` paths; anything else raises :class:`UnsafeCheckpoint`;
- DCP's data files (``*.distcp``): every item at the offset and length ``.metadata`` gives, with
  ``torch.load(weights_only=True)`` (DCP's own loader reads the non-tensor items with
  ``weights_only=False``); :class:`SafeFileSystemReader` and :class:`SafeLoadPlanner` are DCP's reader and
  planner with these loaders, for reading a checkpoint without trusting it.

:func:`check_loads` loads every such file of a directory this way and returns the problems found: a
checkpoint for which it returns nothing holds no code that any loader of this package, DeepSpeed's or
DCP's would run (their pickles reference only the allow-listed classes).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import stat
from pathlib import Path
from typing import Any, Iterator, List

import torch

__all__ = ["UnsafeCheckpoint", "DcpMetadataUnpickler", "load_dcp_metadata", "safe_torch_load",
           "SafeFileSystemReader", "SafeLoadPlanner", "check_loads", "weights_only_torch_load"]


class UnsafeCheckpoint(RuntimeError):
    """A file that does not load with the safe loaders (code in a pickle, or a corrupt file)."""


def _safe_globals() -> list:
    from .deepspeed.universal import deepspeed_safe_globals
    return deepspeed_safe_globals()


def safe_torch_load(f: Any, mmap: bool = False) -> Any:
    """``torch.load(f, weights_only=True)`` with DeepSpeed's checkpoint classes allow-listed."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)


_DCP_METADATA = {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING"}
_PATHS = {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}


class DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``, admitting only its metadata classes (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        ok = ((module == "torch.distributed.checkpoint.metadata" and name in _DCP_METADATA)
              or (module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo")
              or (module == "torch.serialization" and name == "_get_layout")
              or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                                      (torch.dtype, torch.layout,
                                                                       torch.memory_format))))
              or (module == "pathlib" and name in _PATHS)
              or (module == "collections" and name == "OrderedDict"))
        if not ok:
            raise UnsafeCheckpoint(f"the DCP metadata references {module}.{name}, which is not one of torch's DCP "
                                   "metadata classes: refusing to unpickle it (it could run code)")
        return super().find_class(module, name)


def load_dcp_metadata(path: Path) -> Any:
    """DCP's ``Metadata`` from a ``.metadata`` file, with :class:`DcpMetadataUnpickler`."""
    with open(path, "rb") as f:
        try:
            return DcpMetadataUnpickler(f).load()
        except UnsafeCheckpoint as e:
            raise UnsafeCheckpoint(f"{path}: {e}") from None
        except Exception as e:  # EOFError / UnpicklingError / AttributeError on a corrupt file
            raise UnsafeCheckpoint(f"cannot read {path} ({type(e).__name__}: {e}): truncated or corrupt") from e


def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.storage import StorageMeta

    class _Reader(FileSystemReader):
        """DCP's FileSystemReader whose ``.metadata`` goes through :class:`DcpMetadataUnpickler`."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            meta = load_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta
    return _Reader


def SafeFileSystemReader(path: os.PathLike | str):  # noqa: N802 - a class factory (torch is imported late)
    return _reader_class()(str(path))


def SafeLoadPlanner(**kwargs):  # noqa: N802
    """DCP's ``_EmptyStateDictLoadPlanner`` whose non-tensor items load with ``weights_only=True``."""
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    class _Planner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = safe_torch_load(value)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj
    return _Planner(**kwargs)


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Within the block, every ``torch.load`` (also DeepSpeed's ``weights_only=False`` ones) is
    :func:`safe_torch_load`: a converter run this way executes no code from the files it reads."""
    original = torch.load

    def load(f, map_location=None, *args, weights_only=None, mmap=None, **kwargs):
        with torch.serialization.safe_globals(_safe_globals()):
            return original(f, map_location=map_location, weights_only=True, mmap=mmap)
    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _dcp_items(ckpt: Path) -> List[str]:
    meta = load_dcp_metadata(ckpt / ".metadata")
    if not isinstance(getattr(meta, "storage_data", None), dict):
        return [f"{ckpt / '.metadata'} is not DCP metadata (a {type(meta).__name__})"]
    problems = []
    for index, info in sorted(meta.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)):
        f = ckpt / info.relative_path
        if getattr(info, "transform_descriptors", None):
            problems.append(f"{f}: item {index.fqn} is stored with transforms {info.transform_descriptors}, which "
                            "this check does not read")
            continue
        with open(f, "rb") as fh:
            fh.seek(info.offset)
            data = fh.read(info.length)
        if len(data) != info.length:
            problems.append(f"{f}: item {index.fqn} is truncated ({len(data)} of {info.length} bytes)")
            continue
        try:
            safe_torch_load(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - reported
            problems.append(f"{f}: item {index.fqn} does not load with weights_only=True ({type(e).__name__}: "
                            f"{str(e)[:200]})")
    return problems


def check_loads(ckpt: Path) -> List[str]:
    """The problems of loading every pickle of the checkpoint directory ``ckpt`` with the safe loaders
    (empty: nothing in it runs code); symlinks and special files are problems too."""
    ckpt = Path(ckpt)
    problems: List[str] = []
    for dirpath, dirnames, filenames in os.walk(ckpt):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                problems.append(f"{p} is a symlink")
            elif name in filenames and not stat.S_ISREG(st.st_mode):
                problems.append(f"{p} is not a regular file")
            elif name in filenames and p.suffix in (".pt", ".pth", ".bin", ".pkl", ".pickle"):
                try:
                    safe_torch_load(p, mmap=False)
                except Exception as e:  # noqa: BLE001 - reported
                    problems.append(f"{p} does not load with torch.load(weights_only=True) ({type(e).__name__}: "
                                    f"{str(e)[:200]}): it holds code or is corrupt")
            elif name in filenames and p.suffix == ".json":
                try:
                    json.loads(p.read_text())
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    problems.append(f"{p} is not valid JSON ({e})")
    if (ckpt / ".metadata").is_file():
        try:
            problems += _dcp_items(ckpt)
        except UnsafeCheckpoint as e:
            problems.append(str(e))
        except OSError as e:
            problems.append(f"{ckpt}: a DCP data file cannot be read ({e})")
    return problems
