"""Preparation-time transforms applied by ``proseg prepare``: intensity scaling, pad-to-square + resize, rater
order. All act on one case at a time, vectorized over channels, raters and slices.

Conventions:
    * images ``(C, H, W)`` or ``(C, D, H, W)`` float32; masks ``(R, H, W)`` / ``(R, D, H, W)`` bool.
    * Pad to square (centred, the smaller pad before, as the LIDC papers' ``pad_im``) with the value 0 *in source
      units* (the scaled value of 0 after intensity scaling), masks padded with False; then resize H x W to
      ``size x size``: bilinear with antialiasing for images, nearest for masks (they stay binary).
    * Rater order ``area-ranked``: per case, present raters sorted by foreground area ascending (ties keep the
      stored order), absent raters last; the LIDC papers' ``ranking(is_rank=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from proseg.data.types import DataError, Sample

INTENSITY_MODES = ("auto", "none", "uint8", "minmax", "zscore")
RATER_ORDERS = ("as-stored", "area-ranked")
# Old spellings still read (stores and checkpoints written before the rename) and accepted on the command line.
_INTENSITY_ALIASES = {"unit8": "uint8"}


@dataclass(frozen=True)
class Geometry:
    """How a case's in-plane grid was mapped to the stored grid (to write predictions back).

    ``pad = (top, bottom, left, right)`` in source pixels, then the padded square of side ``padded`` was resized
    to ``size``.
    """

    orig_hw: tuple[int, int]
    pad: tuple[int, int, int, int]
    padded: int
    size: int

    def to_json(self) -> dict:
        return {"orig_hw": list(self.orig_hw), "pad": list(self.pad), "padded": self.padded, "size": self.size}


def canonical_intensity(mode: str) -> str:
    """The current spelling of an intensity mode: ``"unit8"`` (how manifests, checkpoints and ``--intensity``
    spelled ``"uint8"`` before it was renamed) -> ``"uint8"``; any other value is returned unchanged.

    Apply it wherever a recorded mode is read (a store's manifest, a checkpoint's ``preprocessing``)."""
    return _INTENSITY_ALIASES.get(mode, mode) if isinstance(mode, str) else mode


def recorded_intensity(value: Any) -> str | None:
    """The mode recorded in a manifest's or checkpoint's ``intensity`` entry, in its current spelling: the entry is
    ``{"mode": applied, "requested": ..., "description": ...}`` (or, in old checkpoints, the mode itself);
    None when nothing is recorded."""
    mode = value.get("mode") if isinstance(value, dict) else value
    return None if mode is None else canonical_intensity(str(mode))


def resolve_intensity(mode: str, source_dtype: str) -> str:
    """``auto`` -> ``uint8`` (divide by 255) for uint8 sources, ``zscore`` (per case and channel) otherwise.
    The old spelling ``unit8`` is accepted (:func:`canonical_intensity`)."""
    mode = canonical_intensity(mode)
    if mode not in INTENSITY_MODES:
        raise DataError(f"intensity mode must be one of {INTENSITY_MODES}, got {mode!r}")
    if mode == "auto":
        return "uint8" if source_dtype == "uint8" else "zscore"
    return mode


def scale_intensity(image: np.ndarray, mode: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Scale ``image`` (C, ...) per the resolved ``mode``; returns ``(scaled float32, pad_value per channel)``.

    ``uint8``: x / 255, requires values in [0, 255]. ``minmax``: per channel to [0, 1] (a constant channel maps
    to 0). ``zscore``: per channel (x - mean) / std (std 0 -> 1). ``none``: unchanged. ``pad_value`` is the
    scaled value of a source 0, so padding matches what the papers pad with.
    """
    x = image.astype(np.float32, copy=False)
    c = x.shape[0]
    flat = x.reshape(c, -1)
    if mode == "none":
        return x, np.zeros(c, np.float32)
    if mode == "uint8":
        lo, hi = float(flat.min()), float(flat.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{source}: intensity mode uint8 expects values in [0, 255], found [{lo:g}, {hi:g}]")
        return x / np.float32(255.0), np.zeros(c, np.float32)
    if mode == "minmax":
        lo = flat.min(axis=1)
        rng = flat.max(axis=1) - lo
        rng = np.where(rng > 0, rng, 1.0).astype(np.float32)
    elif mode == "zscore":
        lo = flat.mean(axis=1, dtype=np.float64).astype(np.float32)
        rng = flat.std(axis=1, dtype=np.float64).astype(np.float32)
        rng = np.where(rng > 0, rng, 1.0).astype(np.float32)
    else:
        raise DataError(f"unknown intensity mode {mode!r}")
    shape = (c,) + (1,) * (x.ndim - 1)
    out = (x - lo.reshape(shape)) / rng.reshape(shape)
    return out.astype(np.float32, copy=False), (-lo / rng).astype(np.float32)


def pad_resize(
    image: np.ndarray, masks: np.ndarray, size: int | None, pad_value: np.ndarray
) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Pad H x W to a centred square, then resize to ``size x size``; ``size=None`` keeps the source grid.

    Args:
        image: ``(C, H, W)`` or ``(C, D, H, W)`` float32.
        masks: ``(R, H, W)`` or ``(R, D, H, W)`` bool.
        size: target side; None keeps the source size (no padding, no resizing).
        pad_value: ``(C,)`` image fill value per channel.
    """
    h, w = image.shape[-2:]
    if size is None:
        return image, masks, Geometry((h, w), (0, 0, 0, 0), max(h, w), max(h, w))
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    pad = (top, side - h - top, left, side - w - left)
    if side != h or side != w:
        img = np.empty(image.shape[:-2] + (side, side), np.float32)
        img[...] = pad_value.reshape((-1,) + (1,) * (image.ndim - 1))
        img[..., top : top + h, left : left + w] = image
        msk = np.zeros(masks.shape[:-2] + (side, side), bool)
        msk[..., top : top + h, left : left + w] = masks
        image, masks = img, msk
    if side != size:
        image, masks = _resize(image, masks, size)
    return np.ascontiguousarray(image), np.ascontiguousarray(masks), Geometry((h, w), pad, side, size)


def _resize(image: np.ndarray, masks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    import torch
    import torch.nn.functional as F

    side = image.shape[-1]
    lead_i, lead_m = image.shape[:-2], masks.shape[:-2]
    ti = torch.from_numpy(np.ascontiguousarray(image)).reshape(1, -1, side, side)
    tm = torch.from_numpy(np.ascontiguousarray(masks)).reshape(1, -1, side, side).to(torch.uint8)
    ri = F.interpolate(ti, size=(size, size), mode="bilinear", align_corners=False, antialias=size < side)
    rm = F.interpolate(tm, size=(size, size), mode="nearest-exact")
    return (
        ri.reshape(lead_i + (size, size)).numpy().astype(np.float32, copy=False),
        rm.reshape(lead_m + (size, size)).numpy().astype(bool),
    )


def order_raters(masks: np.ndarray, present: np.ndarray, order: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-order raters; returns ``(masks, present, permutation)`` with ``new[r] = old[perm[r]]``.

    ``area-ranked``: ascending foreground area over the whole case (all slices of a volume), stable, absent
    raters last.
    """
    r = masks.shape[0]
    if order == "as-stored":
        perm = np.arange(r)
    elif order == "area-ranked":
        area = masks.reshape(r, -1).sum(axis=1).astype(np.float64)
        area = np.where(present, area, np.inf)
        perm = np.argsort(area, kind="stable")
    else:
        raise DataError(f"rater order must be one of {RATER_ORDERS}, got {order!r}")
    return masks[perm], present[perm], perm


def validate_sample(s: Sample) -> None:
    """Check a reader's ``Sample`` against the data model (shapes, dtypes, finiteness); ``DataError`` if not."""
    src = s.source or s.case_id
    if s.image.ndim not in (3, 4):
        raise DataError(f"{src}: image must be (C,H,W) or (C,D,H,W), got shape {s.image.shape}")
    if s.image.size == 0:
        raise DataError(f"{src}: empty image of shape {s.image.shape}")
    if s.masks.ndim != s.image.ndim:
        raise DataError(f"{src}: masks {s.masks.shape} and image {s.image.shape} differ in rank")
    if s.masks.shape[1:] != s.image.shape[1:]:
        raise DataError(
            f"{src}: image/mask shape mismatch: image spatial {s.image.shape[1:]} vs masks {s.masks.shape[1:]}"
        )
    if s.masks.shape[0] < 1:
        raise DataError(f"{src}: no rater masks")
    if s.masks.dtype != np.bool_:
        raise DataError(f"{src}: masks must be bool, got {s.masks.dtype}")
    if s.rater_present.shape != (s.masks.shape[0],):
        raise DataError(f"{src}: rater_present {s.rater_present.shape} does not match {s.masks.shape[0]} raters")
    if len(s.rater_names) != s.masks.shape[0]:
        raise DataError(f"{src}: {len(s.rater_names)} rater names for {s.masks.shape[0]} masks")
    if not np.isfinite(s.image).all():
        raise DataError(f"{src}: image holds NaN/Inf values")
