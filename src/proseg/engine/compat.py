"""Does a prepared dataset match the data a checkpoint was trained on?

A checkpoint's ``model.json`` records its training data (``dataset``: channels, raters, rater names, manifest
checksum, preprocessing; see :func:`proseg.engine.data.dataset_meta`). Scoring it on a store prepared differently
either means nothing (another number of image channels; personalized outputs over another number of raters) or
is off the training distribution (another intensity transform, image size or rater order, raters under other
names). The first is an error, the second a :class:`~proseg.errors.ProsegWarning` naming both sides.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from proseg.data.preprocess import recorded_intensity
from proseg.data.store import Store
from proseg.engine.checkpoint import manifest_checksum
from proseg.errors import DataError, ProsegWarning

__all__ = ["check_dataset_matches"]


def _image_size(store: Store) -> tuple[int, int] | None:
    shape = store.manifest.get("shapes", {}).get("images")
    return (int(shape[-2]), int(shape[-1])) if shape and len(shape) >= 2 else None


def check_dataset_matches(trained_on: dict[str, Any] | None, store: Store, *, in_channels: int, num_raters: int,
                          modes: Sequence[str], checkpoint: str = "the checkpoint") -> list[str]:
    """Raise :class:`DataError` where scoring ``store`` would be meaningless; warn (and return the warnings) where
    it differs from the checkpoint's training data ``trained_on`` (``model.json``'s ``dataset`` entry, or None for
    a checkpoint that records none: then only channels and raters are checked).

    Errors: the store's image channels differ from ``in_channels``; personalized scoring (``"personalized"`` in
    ``modes``) with another number of raters than ``num_raters``.
    Warnings: intensity mode, image size (the checkpoint's ``target_size`` vs the store's H x W), rater order,
    rater names (in personalized mode rater ``k`` of the store is compared with rater ``k`` of the model).
    """
    where = f"{store.path}"
    if store.num_channels != in_channels:
        raise DataError(f"{where}: the dataset has {store.num_channels} image channel(s) but {checkpoint} expects "
                        f"{in_channels}")
    if "personalized" in modes and store.num_raters != num_raters:
        raise DataError(f"{where}: the dataset has {store.num_raters} raters but {checkpoint} was trained for "
                        f"{num_raters}; personalized outputs cannot be matched to raters (evaluate with --mode "
                        "diverse to compare populations only)")
    if not trained_on:
        return []
    if trained_on.get("manifest_sha256") and trained_on.get("manifest_sha256") == manifest_checksum(store.path):
        return []  # the very store it was trained on
    notes: list[str] = []
    prep = trained_on.get("preprocessing") or {}
    man = store.manifest
    ours, theirs = recorded_intensity(man.get("intensity")), recorded_intensity(prep.get("intensity"))
    if theirs is not None and ours != theirs:
        notes.append(f"intensity: {checkpoint} was trained on '{theirs}'-normalised images, {where} holds "
                     f"'{ours}'-normalised ones")
    size = _image_size(store)
    tsize = prep.get("target_size")
    if tsize and size is not None and tuple(size) != (int(tsize), int(tsize)):
        notes.append(f"image size: {checkpoint} was trained on {tsize}x{tsize} images, {where} holds "
                     f"{size[0]}x{size[1]}")
    if prep.get("rater_order") and man.get("rater_order") and prep["rater_order"] != man["rater_order"]:
        notes.append(f"rater order: {checkpoint} was trained with raters '{prep['rater_order']}', {where} stores "
                     f"them '{man['rater_order']}'")
    names = trained_on.get("rater_names")
    if "personalized" in modes and names and list(names) != list(store.rater_names):
        notes.append(f"rater names: {checkpoint} knows raters {list(names)}, {where} has {list(store.rater_names)}; "
                     "personalized scores compare them by position")
    for note in notes:
        warnings.warn(f"dataset differs from the checkpoint's training data: {note}", ProsegWarning, stacklevel=2)
    return notes

