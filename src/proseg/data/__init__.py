"""Data layer: readers for the real multi-rater formats, the canonical store, splits, the Dataset."""

from proseg.data.types import DataError, Sample

__all__ = ["DataError", "Sample"]
