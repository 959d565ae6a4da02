"""Read a JSON file that must hold one object (the job config, a DeepSpeed config)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Type, Union

from .config import ConfigError


def read_json_object(path: Union[str, os.PathLike], error: Type[Exception] = ConfigError) -> Dict[str, Any]:
    """The dict in the JSON file ``path``; raises ``error`` (default
    :class:`~sharded_msam_sf.config.ConfigError`) when the file is missing, is not JSON, or
    holds something other than an object, or when a key is given twice in one object (JSON itself
    would silently keep the last one)."""
    p = Path(path)
    if not p.is_file():
        raise error(f"config file not found: {p}")
    try:
        data = json.loads(p.read_text(), object_pairs_hook=_no_duplicate_keys(p, error))
    except json.JSONDecodeError as e:
        raise error(f"config file {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise error(f"config file {p} must hold a JSON object")
    return data


def _no_duplicate_keys(path: Path, error: Type[Exception]):
    """json object_pairs_hook: a key given twice in one object is an error."""
    def hook(pairs):
        seen: Dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:
                raise error(f"config file {path}: key '{k}' is given twice in one object "
                            "(JSON would silently keep the last one)")
            seen[k] = v
        return seen
    return hook
