"""Data layer: readers for the real multi-rater formats, the canonical store, splits, the Dataset.

The main entry points are re-exported lazily (so ``import proseg.data`` stays light: no torch, h5py, nibabel):
``open_store``/``Store`` (``proseg.data.store``), ``MultiRaterDataset`` (``proseg.data.dataset``),
``AugmentConfig`` (``proseg.data.augment``), ``make_splits`` (``proseg.data.splits``),
``list_cases``/``read_samples`` (``proseg.data.readers``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from proseg.data.types import DataError, Sample

_LAZY = {
    "open_store": "proseg.data.store",
    "Store": "proseg.data.store",
    "MultiRaterDataset": "proseg.data.dataset",
    "AugmentConfig": "proseg.data.augment",
    "make_splits": "proseg.data.splits",
    "list_cases": "proseg.data.readers",
    "read_samples": "proseg.data.readers",
}

__all__ = ["DataError", "Sample", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'proseg.data' has no attribute {name!r}")
