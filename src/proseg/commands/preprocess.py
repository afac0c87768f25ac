"""A ``proseg predict`` input to the model's space, as ``proseg prepare`` made the training data, and back.

Forward (:func:`preprocess`): the intensity scaling and the centred pad-to-square + resize of
:mod:`proseg.data.preprocess`, with the settings the checkpoint records for its dataset. Inverse
(:func:`unprocess`): model-space maps resized back (bilinear) to the padded square and un-padded, onto the
input's own grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from proseg.commands.inputs import InputCase
from proseg.data.preprocess import pad_resize, resolve_intensity, scale_intensity


@dataclass
class Prepared:
    image: np.ndarray  # (C, D, size, size) model space
    pad: tuple[int, int, int, int]
    padded: int
    hw: tuple[int, int]


def preprocess(case: InputCase, prep: dict[str, Any]) -> Prepared:
    """Intensity scaling and pad/resize exactly as ``proseg prepare`` did for the training data."""
    intensity = prep.get("intensity") or {}
    mode = intensity.get("mode", "auto") if isinstance(intensity, dict) else str(intensity)
    mode = resolve_intensity(mode, case.source_dtype)
    image, pad_value = scale_intensity(case.image, mode, str(case.path))
    size = prep.get("target_size")
    masks = np.zeros((1,) + image.shape[1:], bool)  # pad_resize resizes masks alongside; none here
    out, _, geom = pad_resize(image, masks, int(size) if size else None, pad_value)
    return Prepared(out.astype(np.float32), tuple(geom.pad), geom.padded, tuple(geom.orig_hw))  # type: ignore[arg-type]


def unprocess(maps: torch.Tensor, prep: Prepared) -> torch.Tensor:
    """Map ``(..., size, size)`` model-space maps back to the input grid ``(..., H, W)`` (bilinear, then un-pad)."""
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    if x.shape[-1] != prep.padded:
        x = F.interpolate(x, size=(prep.padded, prep.padded), mode="bilinear", align_corners=False)
    top, _, left, _ = prep.pad
    h, w = prep.hw
    x = x[..., top : top + h, left : left + w]
    return x.reshape(*lead, h, w)
