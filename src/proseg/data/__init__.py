"""Data layer: readers for the real multi-rater formats, the canonical store, splits, the Dataset.

Heavy modules (torch, h5py, nibabel) are imported lazily by the submodules that need them.
"""

from proseg.data.types import DataError, Sample

__all__ = ["DataError", "Sample"]
