"""What every reader provides: a cheap listing of cases, each loaded lazily (so ``prepare`` can decode in a
thread pool and filter by patient before reading any pixels)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from proseg.data.types import DataError, Sample


@dataclass(frozen=True)
class CaseRef:
    """One case of a source, not yet read. ``load()`` returns its ``Sample`` or raises ``DataError``."""

    case_id: str
    patient_id: str
    load: Callable[[], Sample]


def natural_key(text: str) -> tuple:
    """Sort key that orders ``slice-2`` before ``slice-10``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def require_dir(src: str | Path, what: str) -> Path:
    p = Path(src)
    if not p.exists():
        raise DataError(f"{p}: source not found")
    if not p.is_dir():
        raise DataError(f"{p}: expected a folder holding {what}")
    return p


def no_cases(src: Path, what: str) -> DataError:
    return DataError(f"{src}: no cases found (expected {what})")


def iter_loaded(cases: list[CaseRef]) -> Iterator[Sample]:
    for c in cases:
        yield c.load()


def image_to_channels_first(arr: np.ndarray, spatial_ndim: int, path: str | Path) -> np.ndarray:
    """``(H,W)`` -> ``(1,H,W)``; ``(H,W,C)`` PNG-style channels-last -> ``(C,H,W)`` (used for 2D images)."""
    if arr.ndim == spatial_ndim:
        return arr[None]
    if arr.ndim == spatial_ndim + 1:
        return np.moveaxis(arr, -1, 0)
    raise DataError(f"{path}: expected a {spatial_ndim}D image (optionally with channels), got shape {arr.shape}")
