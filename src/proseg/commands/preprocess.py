"""A ``proseg predict`` input to the model's space, as ``proseg prepare`` made the training data, and back.

Forward (:func:`preprocess`), on the input grid the input was read in (NIfTI: canonical RAS+ orientation):

1. the intensity transform the checkpoint records for its dataset (``model.json`` -> ``dataset.preprocessing
   .intensity``: mode and window / percentiles), or the one ``--intensity`` / ``--window`` / ``--percentiles``
   give for inputs in other units than the training data (e.g. a raw CT in Hounsfield units for a model trained
   on 8-bit windowed PNGs); computed on the whole input, so a crop is scaled as its whole image;
2. with ``roi = (y0, x0, h, w)`` the crop ``[y0:y0+h, x0:x0+w]`` of every slice (H, W axes as read);
3. with ``spacing`` (mm, NIfTI x, y[, z]) a resampling to that voxel size (``scipy.ndimage.zoom``, order 1);
4. the centred pad-to-square + resize of :mod:`proseg.data.preprocess` to the checkpoint's target size; or, with
   ``window`` (``--sliding-window``: the target size), no resize: the image stays on its own grid (an axis shorter
   than the window is padded, centred, up to it) and is predicted in windows (:func:`window_starts`,
   :func:`blend_weight`). An input that fits in one window in both axes falls back to step 4 (``window`` None in
   the :class:`Prepared`).

Inverse (:func:`unprocess`): model-space maps resized back (bilinear) to the padded square and un-padded, resampled
back to the crop's grid (order 1: probabilities; masks are thresholded afterwards) and pasted into a map of the
input's full size (zeros outside the ROI).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from proseg.commands.inputs import InputCase
from proseg.data.preprocess import Intensity, pad_resize, scale_intensity
from proseg.errors import DataError


@dataclass
class Prepared:
    image: np.ndarray  # (C, D, size, size) model space
    pad: tuple[int, int, int, int]
    padded: int
    hw: tuple[int, int]  # the grid that was padded and resized (after the crop and the resampling)
    full_shape: tuple[int, int, int] = (0, 0, 0)  # (D, H, W) of the input grid
    roi: tuple[int, int, int, int] | None = None  # (y0, x0, h, w) on the input grid
    crop_shape: tuple[int, int, int] | None = None  # (D, h, w) before resampling, when resampled
    intensity: Intensity | None = None
    window: int | None = None  # sliding window: ``image`` is on its own grid (padded by ``pad``), tiled at this side


def input_intensity(case: InputCase, prep: dict[str, Any], override: Intensity | None = None) -> Intensity:
    """The transform applied to ``case``: ``override`` (the command-line options) or what the checkpoint records
    (``auto`` when nothing), resolved for the input's dtype. An 8-bit input under a recorded window in
    other units (a CT window in Hounsfield units) is refused: it is most likely already windowed."""
    if override is not None:
        return override.resolve(case.source_dtype)
    recorded = Intensity.from_record(prep.get("intensity")) or Intensity("auto")
    spec = recorded.resolve(case.source_dtype)
    if spec.mode == "window" and spec.window is not None and case.source_dtype in ("uint8", "bool") \
            and spec.window[0] < 0:
        lo, hi = spec.window
        raise DataError(f"{case.path}: an 8-bit input, but the checkpoint's training data was mapped from the "
                        f"window [{lo:g}, {hi:g}] (e.g. Hounsfield units): an 8-bit image is most likely already "
                        "windowed; pass --intensity uint8 if it was made with that window (x / 255)")
    return spec


def preprocess(case: InputCase, prep: dict[str, Any], *, intensity: Intensity | None = None,
               roi: tuple[int, int, int, int] | None = None,
               spacing: tuple[float, ...] | None = None, window: int | None = None) -> Prepared:
    """Intensity, crop, resampling and pad/resize as ``proseg prepare`` did for the training data (module doc);
    with ``window`` the image is kept on its own grid for sliding-window inference (padded up to the window where
    shorter), unless it fits in one window (then pad/resize as without it)."""
    spec = input_intensity(case, prep, intensity)
    image, pad_value = scale_intensity(case.image, spec, str(case.path))
    full = tuple(int(v) for v in image.shape[1:])
    if roi is not None:
        y0, x0, h, w = check_roi(roi, full[1:], str(case.path))
        image = image[:, :, y0 : y0 + h, x0 : x0 + w]
    crop_shape = None
    if spacing is not None:
        crop_shape = tuple(int(v) for v in image.shape[1:])
        image = resample(image, _zoom_factors(case, spacing))
    if window is not None and max(image.shape[-2:]) > window:
        return _for_windows(image, pad_value, window, full, roi, crop_shape, spec)
    size = prep.get("target_size")
    masks = np.zeros((1,) + image.shape[1:], bool)  # pad_resize resizes masks alongside; none here
    out, _, geom = pad_resize(np.ascontiguousarray(image), masks, int(size) if size else None, pad_value)
    return Prepared(out.astype(np.float32), tuple(geom.pad), geom.padded, tuple(geom.orig_hw),  # type: ignore[arg-type]
                    full, roi, crop_shape, spec)  # type: ignore[arg-type]


def _for_windows(image: np.ndarray, pad_value: float, window: int, full: tuple[int, ...],
                 roi: tuple[int, int, int, int] | None, crop_shape: tuple[int, ...] | None,
                 spec: Intensity) -> Prepared:
    h, w = (int(v) for v in image.shape[-2:])
    ph, pw = max(0, window - h), max(0, window - w)
    pad = (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)
    if ph or pw:
        image = np.pad(image, ((0, 0), (0, 0), pad[:2], pad[2:]), constant_values=pad_value)
    return Prepared(np.ascontiguousarray(image, np.float32), pad, 0, (h, w), full, roi, crop_shape,  # type: ignore[arg-type]
                    spec, window)


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows of side ``window`` covering ``length`` (>= window) with at least ``overlap`` (a
    fraction of the window, in [0, 1)) between neighbours: the first at 0, the last at ``length - window``, evenly
    spaced between. ``length == 2 * window`` with overlap 0 gives ``[0, window]``."""
    if length <= window:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    n = int(np.ceil((length - window) / step)) + 1
    return [int(v) for v in np.round(np.linspace(0, length - window, n))]


BLENDS = ("gaussian", "uniform")


def blend_weight(window: int, blend: str) -> torch.Tensor:
    """``(window, window)`` weight of a window's probabilities where windows overlap: ``uniform`` (ones) or
    ``gaussian`` (centred, sigma = window / 8 as nnU-Net, so window borders count little; at least 1e-4)."""
    if blend == "uniform":
        return torch.ones(window, window)
    c = (window - 1) / 2.0
    d = torch.arange(window, dtype=torch.float64) - c
    g = torch.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2.0 * (window / 8.0) ** 2))
    return (g / g.max()).clamp_min(1e-4).float()


def check_roi(roi: tuple[int, int, int, int], hw: tuple[int, int], source: str) -> tuple[int, int, int, int]:
    """``roi = (y0, x0, h, w)`` inside an ``hw`` grid, else ``DataError`` naming ``--roi``."""
    y0, x0, h, w = (int(v) for v in roi)
    if h < 1 or w < 1 or y0 < 0 or x0 < 0 or y0 + h > hw[0] or x0 + w > hw[1]:
        raise DataError(f"{source}: --roi {y0},{x0},{h},{w} (y0,x0,h,w) does not lie inside the input's "
                        f"{hw[0]} x {hw[1]} grid (H x W as read)")
    return y0, x0, h, w


def _zoom_factors(case: InputCase, spacing: tuple[float, ...]) -> tuple[float, float, float]:
    """Zoom factors of the ``(D, H, W)`` axes that resample ``case`` to ``spacing`` (x, y[, z] in mm)."""
    zooms = case.extra.get("ras_zooms")
    if case.kind != "nifti" or not zooms:
        raise DataError(f"{case.path}: --resample needs the input's voxel size, which only NIfTI inputs record")
    zx, zy = float(zooms[0]), float(zooms[1])
    tx, ty = float(spacing[0]), float(spacing[1])
    fz = 1.0
    if case.image.shape[1] > 1 and len(spacing) > 2 and len(zooms) > 2:
        fz = float(zooms[2]) / float(spacing[2])
    return fz, zx / tx, zy / ty


def resample(image: np.ndarray, factors: tuple[float, float, float]) -> np.ndarray:
    """``(C, D, H, W)`` (or any ``(..., D, H, W)``) resampled by ``factors`` of the last three axes, trilinear
    (``scipy.ndimage.zoom``, order 1, voxel-edge aligned)."""
    shape = image.shape[-3:]
    target = tuple(max(1, int(round(n * f))) for n, f in zip(shape, factors, strict=True))
    return resample_to(image, target)


def resample_to(image: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    """``(..., D, H, W)`` resampled to the grid ``target = (D', H', W')`` (order 1, ``grid_mode``)."""
    from scipy import ndimage

    shape = image.shape[-3:]
    if tuple(shape) == tuple(target):
        return image
    lead = image.shape[:-3]
    flat = image.reshape((-1,) + tuple(shape))
    zoom = [t / n for t, n in zip(target, shape, strict=True)]
    out = np.stack([ndimage.zoom(v.astype(np.float32), zoom, order=1, mode="nearest", grid_mode=True)
                    for v in flat])
    return out.reshape(lead + tuple(target)).astype(np.float32, copy=False)


def unprocess(maps: torch.Tensor, prep: Prepared) -> torch.Tensor:
    """Map ``(..., size, size)`` model-space maps back to the input grid ``(..., D, H, W)``: bilinear (not for
    sliding-window maps, already on the input's grid), un-pad, resample back (order 1) and paste into the full
    grid (zeros outside the ROI)."""
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    if prep.window is None and x.shape[-1] != prep.padded:
        x = F.interpolate(x, size=(prep.padded, prep.padded), mode="bilinear", align_corners=False)
    top, _, left, _ = prep.pad
    h, w = prep.hw
    x = x[..., top : top + h, left : left + w].reshape(*lead, h, w)
    if prep.crop_shape is None and prep.roi is None:
        return x
    if prep.crop_shape is not None:
        x = torch.from_numpy(resample_to(x.cpu().numpy(), prep.crop_shape)).to(maps.device)
    if prep.roi is None:
        return x
    y0, x0, rh, rw = prep.roi
    full = torch.zeros(*x.shape[:-2], *prep.full_shape[-2:], dtype=x.dtype, device=x.device)
    full[..., y0 : y0 + rh, x0 : x0 + rw] = x
    return full
