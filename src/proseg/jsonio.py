"""One rule for every JSON file and line proseg writes: strict JSON, where NaN and +-Inf (undefined metrics,
a diverged loss) become ``null``, NumPy scalars and arrays become numbers and lists, paths become strings.

Readers therefore never meet the non-standard ``NaN`` token (which ``jq``, JavaScript and many JSON libraries
refuse); ``null`` reads back as ``None`` (``float("nan")`` where a number is needed: :func:`nan_if_none`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proseg.fsutil import atomic_write_text

__all__ = ["dumps", "nan_if_none", "to_jsonable", "write_json"]


def to_jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as None, NumPy values as Python ones, paths and other objects as strings."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):  # dicts and read-only mappings (MappingProxyType defaults)
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # NumPy scalars and arrays, torch tensors
        return to_jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict ``json.dumps`` of :func:`to_jsonable` (``allow_nan=False``: a NaN that slipped through is a bug)."""
    return json.dumps(to_jsonable(obj), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as strict JSON to ``path`` atomically (temp file, fsync, rename), ending with a newline."""
    atomic_write_text(Path(path), dumps(obj, indent=indent, sort_keys=True) + "\n")


def nan_if_none(value: Any) -> float:
    """A number read back from proseg JSON: ``None`` (written for NaN/Inf) -> ``nan``."""
    return math.nan if value is None else float(value)
