"""Joint augmentation of one image and all of its rater masks (numpy, per item, inside DataLoader workers).

Every geometric transform is applied identically to the image ``(C, H, W)`` and to all masks ``(R, H, W)`` in one
call (no loop over raters): flips and rot90 are exact; a small rotation resamples the image bilinearly and the
masks by nearest neighbour, so masks stay exactly binary. Intensity noise touches the image only. Randomness
comes from the ``numpy.random.Generator`` passed in (the Dataset derives it from ``seed, epoch, index``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["AugmentConfig", "augment_item", "augment_pair"]


@dataclass
class AugmentConfig:
    """Which augmentations run, each with its own probability.

    Attributes:
        flip_p: probability of a horizontal flip, and (independently) of a vertical flip.
        rot90_p: probability of rotating by k * 90 degrees, k uniform in {1, 2, 3}.
        rotate_p: probability of a small rotation by an angle uniform in [-rotate_deg, rotate_deg].
        rotate_deg: the largest small-rotation angle, degrees.
        noise_p: probability of adding Gaussian intensity noise.
        noise_std: its standard deviation (in stored intensity units).
        noise_clip: noise values are clipped to +-noise_clip * noise_std (as the D-Persona reference does).
    """

    flip_p: float = 0.5
    rot90_p: float = 0.5
    rotate_p: float = 0.5
    rotate_deg: float = 20.0
    noise_p: float = 0.5
    noise_std: float = 0.05
    noise_clip: float = 2.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def none(cls) -> AugmentConfig:
        """A configuration that changes nothing."""
        return cls(flip_p=0.0, rot90_p=0.0, rotate_p=0.0, noise_p=0.0)


def _rotate(image: np.ndarray, masks: np.ndarray, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate both about the image centre by one shared sampling grid (gathers vectorized over channels and
    raters): bilinear for the image with edge clamping, nearest for the masks with 0 outside."""
    h, w = image.shape[-2:]
    t = np.deg2rad(angle_deg)
    c, s = np.float32(np.cos(t)), np.float32(np.sin(t))
    cy, cx = np.float32((h - 1) / 2.0), np.float32((w - 1) / 2.0)
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32) - cy, np.arange(w, dtype=np.float32) - cx, indexing="ij")
    sy = c * yy - s * xx + cy  # source coordinates of every output pixel
    sx = s * yy + c * xx + cx
    # masks: nearest neighbour, outside -> 0
    ny, nx = np.rint(sy).astype(np.int64), np.rint(sx).astype(np.int64)
    inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    msk = masks[:, np.clip(ny, 0, h - 1), np.clip(nx, 0, w - 1)] * inside.astype(masks.dtype)
    # image: bilinear, coordinates clamped to the border (edge values extend outwards)
    sy, sx = np.clip(sy, 0, h - 1), np.clip(sx, 0, w - 1)
    y0, x0 = np.minimum(sy.astype(np.int64), h - 2), np.minimum(sx.astype(np.int64), w - 2)
    fy, fx = sy - y0, sx - x0
    top = image[:, y0, x0] * (1 - fx) + image[:, y0, x0 + 1] * fx
    bot = image[:, y0 + 1, x0] * (1 - fx) + image[:, y0 + 1, x0 + 1] * fx
    img = top * (1 - fy) + bot * fy
    return img.astype(image.dtype, copy=False), msk


def augment_pair(
    image: np.ndarray, masks: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Augment ``image (C, H, W)`` float32 and ``masks (R, H, W)`` (any dtype, {0, 1}) jointly.

    Returns new arrays (inputs untouched); masks keep their dtype and stay in {0, 1}. The result is a function
    of the generator's state (the Dataset seeds one generator per item).
    """
    u = rng.random(7)
    if u[0] < cfg.flip_p:
        image, masks = image[..., ::-1], masks[..., ::-1]
    if u[1] < cfg.flip_p:
        image, masks = image[..., ::-1, :], masks[..., ::-1, :]
    if u[2] < cfg.rot90_p:
        k = 1 + int(u[3] * 3)  # 1, 2 or 3
        image, masks = np.rot90(image, k, axes=(-2, -1)), np.rot90(masks, k, axes=(-2, -1))
    if u[4] < cfg.rotate_p and cfg.rotate_deg > 0:
        angle = (2 * u[5] - 1) * cfg.rotate_deg
        image, masks = _rotate(np.ascontiguousarray(image), np.ascontiguousarray(masks), angle)
    if u[6] < cfg.noise_p and cfg.noise_std > 0:
        noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(cfg.noise_std)
        lim = np.float32(cfg.noise_clip * cfg.noise_std)
        image = image + np.clip(noise, -lim, lim)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(masks)


def augment_item(
    image: np.ndarray, masks: np.ndarray, cfg: AugmentConfig, seed: int, epoch: int, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`augment_pair` on item ``index`` with its own random stream ``default_rng([seed, epoch, index])``:
    the result depends on neither the DataLoader worker nor the order the items are drawn in."""
    return augment_pair(image, masks, cfg, np.random.default_rng([seed, epoch, index]))
