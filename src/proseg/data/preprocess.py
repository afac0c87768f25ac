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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from proseg.data.types import DataError, Sample

INTENSITY_MODES = ("auto", "none", "uint8", "minmax", "zscore", "window", "percentile")
DEFAULT_PERCENTILES = (0.5, 99.5)
# The window most lung-CT pipelines clip Hounsfield units to (e.g. the LUNA16 preprocessing scripts); the one
# the LIDC-IDRI Kaggle PNG slices were made with is not documented (docs/data.md, "Intensity").
LUNG_WINDOW = (-1000.0, 400.0)
# Modes whose output lies in [0, 1] (an image mapped by one of them is comparable with one mapped by another).
UNIT_RANGE_MODES = ("uint8", "minmax", "window", "percentile")
INTENSITY_DOC = {
    "uint8": "x / 255 (8-bit source to [0, 1])",
    "none": "stored as read (float32)",
    "minmax": "per case and channel: (x - min) / (max - min)",
    "zscore": "per case and channel: (x - mean) / std",
    "window": "clip to the window [lo, hi] (source units, e.g. Hounsfield units), then (x - lo) / (hi - lo)",
    "percentile": "per case and channel: clip to the [p_lo, p_hi] percentiles, then map them to [0, 1]",
}
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


@dataclass(frozen=True)
class Intensity:
    """An intensity transform: ``mode`` (one of ``INTENSITY_MODES``) and its parameters: ``window = (lo, hi)``
    in source units for ``window``, ``percentiles = (p_lo, p_hi)`` for ``percentile``."""

    mode: str
    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] | None = None

    def resolve(self, source_dtype: str) -> Intensity:
        """``auto`` resolved for a source of ``source_dtype`` (:func:`resolve_intensity`); parameters kept."""
        return Intensity(resolve_intensity(self.mode, source_dtype), self.window, self.percentiles)

    def params(self) -> dict[str, Any]:
        if self.mode == "window" and self.window is not None:
            return {"window": [float(v) for v in self.window]}
        if self.mode == "percentile":
            return {"percentiles": [float(v) for v in (self.percentiles or DEFAULT_PERCENTILES)]}
        return {}

    def describe(self) -> str:
        doc = INTENSITY_DOC.get(self.mode, self.mode)
        if self.mode == "window" and self.window is not None:
            return f"{doc}; window [{self.window[0]:g}, {self.window[1]:g}]"
        if self.mode == "percentile":
            lo, hi = self.percentiles or DEFAULT_PERCENTILES
            return f"{doc}; percentiles [{lo:g}, {hi:g}]"
        return doc

    def record(self, requested: str) -> dict[str, Any]:
        """The manifest's ``intensity`` entry: ``{mode, requested, description, [window | percentiles]}``."""
        return {"mode": self.mode, "requested": requested, "description": self.describe(), **self.params()}

    @classmethod
    def from_record(cls, value: Any) -> Intensity | None:
        """The transform a manifest's or checkpoint's ``intensity`` entry records (old spellings and old
        checkpoints' bare mode strings included); None when nothing is recorded."""
        mode = recorded_intensity(value)
        if mode is None:
            return None
        rec = value if isinstance(value, dict) else {}
        window = tuple(float(v) for v in rec["window"]) if rec.get("window") else None
        pct = tuple(float(v) for v in rec["percentiles"]) if rec.get("percentiles") else None
        return cls(mode, window, pct)  # type: ignore[arg-type]


def parse_pair(text: str | Sequence[float] | None, option: str) -> tuple[float, float] | None:
    """``"lo,hi"`` (e.g. ``--window -1000,400``) or a pair of numbers -> ``(lo, hi)`` with lo < hi; None for None."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(v) for v in text]
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise DataError(f"{option} takes two numbers LO,HI (e.g. {option} -1000,400), got {text!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise DataError(f"{option} needs finite LO < HI, got {text!r}")
    return lo, hi


def intensity_from_options(mode: str | None, window: str | Sequence[float] | None = None,
                           percentiles: str | Sequence[float] | None = None,
                           default: str | None = "auto") -> Intensity | None:
    """The transform that ``--intensity MODE`` / ``--window LO,HI`` / ``--percentiles P_LO,P_HI`` ask for
    (``--window`` alone means ``--intensity window``); None when none is given and ``default`` is None."""
    mode = canonical_intensity(mode) if mode else None
    win = parse_pair(window, "--window")
    pct = parse_pair(percentiles, "--percentiles")
    if win is not None:
        if mode not in (None, "auto", "window"):
            raise DataError(f"--window sets the intensity mode 'window'; it cannot be combined with --intensity {mode}")
        mode = "window"
    if pct is not None:
        if mode not in (None, "auto", "percentile"):
            raise DataError(f"--percentiles sets the intensity mode 'percentile'; it cannot be combined with "
                            f"--intensity {mode}")
        if not (0.0 <= pct[0] and pct[1] <= 100.0):
            raise DataError(f"--percentiles must lie in [0, 100], got {percentiles!r}")
        mode = "percentile"
    if mode is None:
        if default is None:
            return None
        mode = default
    if mode not in INTENSITY_MODES:
        raise DataError(f"--intensity must be one of {', '.join(INTENSITY_MODES)}, got {mode!r}")
    if mode == "window" and win is None:
        lo, hi = LUNG_WINDOW
        raise DataError(f"--intensity window needs --window LO,HI (in the source's units, e.g. --window {lo:g},{hi:g} "
                        "for the common lung window in Hounsfield units)")
    return Intensity(mode, win, (pct or DEFAULT_PERCENTILES) if mode == "percentile" else None)


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


def scale_intensity(image: np.ndarray, mode: str | Intensity, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Scale ``image`` (C, ...) per the resolved ``mode``; returns ``(scaled float32, pad_value per channel)``.

    ``uint8``: x / 255, requires values in [0, 255]. ``minmax``: per channel to [0, 1] (a constant channel maps
    to 0). ``zscore``: per channel (x - mean) / std (std 0 -> 1). ``window`` (an :class:`Intensity` with
    ``window=(lo, hi)``): clip to [lo, hi], then to [0, 1]; refused when every value lies on one side of the
    window. ``percentile``: per channel, the ``percentiles`` of the case clipped and mapped to [0, 1].
    ``none``: unchanged. ``pad_value`` is the scaled value of a source 0, so padding matches what the papers pad
    with. Errors name the option that fixes them (``--window``, ``--intensity``).
    """
    spec = mode if isinstance(mode, Intensity) else Intensity(mode)
    mode = spec.mode
    x = image.astype(np.float32, copy=False)
    c = x.shape[0]
    flat = x.reshape(c, -1)
    if mode == "none":
        return x, np.zeros(c, np.float32)
    if mode == "uint8":
        lo, hi = float(flat.min()), float(flat.max())
        if lo < 0 or hi > 255:
            wl, wh = LUNG_WINDOW
            hint = (f"; a CT in Hounsfield units needs --window LO,HI (how the 8-bit training images were windowed, "
                    f"e.g. --window {wl:g},{wh:g}), other units --intensity zscore|minmax|percentile")
            raise DataError(f"{source}: intensity mode uint8 expects values in [0, 255], found [{lo:g}, {hi:g}]"
                            + hint)
        return x / np.float32(255.0), np.zeros(c, np.float32)
    if mode == "window":
        if spec.window is None:
            raise DataError(f"{source}: intensity mode window needs --window LO,HI")
        wlo, whi = (np.float32(v) for v in spec.window)
        vlo, vhi = float(flat.min()), float(flat.max())
        if vhi <= wlo or vlo >= whi:
            raise DataError(f"{source}: every value ([{vlo:g}, {vhi:g}]) lies outside the intensity window "
                            f"[{float(wlo):g}, {float(whi):g}], so the image would be constant: the input is in "
                            "other units than the window; pass --window LO,HI in the input's units or "
                            "--intensity MODE (e.g. uint8 for an 8-bit image that is already windowed)")
        out = (np.clip(x, wlo, whi) - wlo) / (whi - wlo)
        pad = np.float32((np.clip(0.0, wlo, whi) - wlo) / (whi - wlo))
        return out.astype(np.float32, copy=False), np.full(c, pad, np.float32)
    if mode == "percentile":
        plo, phi = spec.percentiles or DEFAULT_PERCENTILES
        q = np.percentile(flat, [plo, phi], axis=1).astype(np.float32)  # (2, C)
        lo, hi = q[0], q[1]
        rng = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
        shape = (c,) + (1,) * (x.ndim - 1)
        clipped = np.clip(x, lo.reshape(shape), np.maximum(hi, lo).reshape(shape))
        out = (clipped - lo.reshape(shape)) / rng.reshape(shape)
        pad = (np.clip(0.0, lo, np.maximum(hi, lo)) - lo) / rng
        return out.astype(np.float32, copy=False), pad.astype(np.float32)
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
