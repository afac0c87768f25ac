"""Readers of the real multi-rater formats. Each lists its cases cheaply (``CaseRef``) and loads them lazily.

``list_cases(format, src, **options)`` dispatches by format name; ``read_samples`` yields loaded ``Sample``s.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from proseg.data.readers import folder, lidc_kaggle, lidc_pickle, npc, qubiq
from proseg.data.readers.base import CaseRef
from proseg.data.types import DataError, Sample

READERS = {
    "lidc-kaggle": lidc_kaggle.list_cases,
    "lidc-pickle": lidc_pickle.list_cases,
    "npc": npc.list_cases,
    "qubiq": qubiq.list_cases,
    "folder": folder.list_cases,
}

__all__ = ["READERS", "CaseRef", "list_cases", "read_samples"]


def list_cases(fmt: str, src: str | Path, **options: Any) -> list[CaseRef]:
    """List the cases of ``src`` in format ``fmt`` (one of ``READERS``); options go to that reader."""
    if fmt not in READERS:
        raise DataError(f"unknown format {fmt!r}; choose one of {sorted(READERS)}")
    return READERS[fmt](src, **options)


def read_samples(fmt: str, src: str | Path, **options: Any) -> Iterator[Sample]:
    """Yield every case of ``src`` as a ``Sample`` (in listing order)."""
    for case in list_cases(fmt, src, **options):
        yield case.load()
