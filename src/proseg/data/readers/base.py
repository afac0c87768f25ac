"""What every reader provides: a cheap listing of cases, each loaded lazily (so ``prepare`` can decode in a
thread pool and filter by patient before reading any pixels)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
