"""Synthetic multi-rater lesions: the embedded default data source, with its generative truth.

Each case ``i`` is a pure function of ``(seed, i)`` (a counter-based splitmix64 hash drives every random number;
pixel noise is read from a fixed normal bank along a hashed progression),
so it is identical whether generated alone, in any batch, in any DataLoader worker, or by ``prepare synthetic``.
All work is vectorized over the batch and the raters (numpy, float32).

Generative model, per image:
    * a lesion: an ellipse (centre, semi-axes, angle) whose radius is modulated by harmonics 2..5, plus 0-2 thin
      protrusions (capsules of half-width 0.8-2 px). ``d_full(x)`` is an approximate signed distance (px,
      negative inside) to that shape; ``d_smooth`` keeps only harmonic 2 of the body; ``d_body`` drops the
      protrusions.
    * an ambiguity ``a ~ U(0, 1)``: edge blur ``0.6 + 3.5 a`` px, contrast ``x (1 - 0.6 a)``, noise std
      ``0.02 + 0.08 a`` and rater jitter ``sigma = 0.4 + 2.6 a`` px all grow with it.
    * the image: background level + smooth texture + contrast * sigmoid(-d_full / blur) + Gaussian noise, clipped
      to [0, 1]; channel ``c`` uses its own contrast factor and noise.
Raters (any ``R >= 1``; styles cycle for ``R > 4``, the offset growing by 50% per cycle), each with a persistent
style: ``over`` (``d_full - delta``: dilates by ``delta = 1.6`` px), ``under`` (``d_full + delta``), ``smooth``
(``d_smooth``), ``thin-miss`` (``d_body``: misses thin parts). Rater ``r``'s expected signed distance is
``d_r``; an annotation is ``d_r + sigma * n_r < 0`` with ``n_r`` a smooth angular noise field (harmonics 0..4 of
the angle around the lesion centre, tabulated at 0.5 degree) whose marginal at every pixel is exactly N(0, 1).
Hence the generative truth::

    probs[r]    = P(rater r marks the pixel) = Phi(-d_r / sigma)      (B, R, H, W) float32
    expected[r] = d_r < 0 = probs[r] > 0.5                            (B, R, H, W) bool
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from proseg.data.augment import AugmentConfig, augment_item
from proseg.data.readers.base import CaseRef
from proseg.data.types import DataError, Sample

STYLES = ("over", "under", "smooth", "thin-miss")
_G = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_NPARAM = 48
_JITTER_K = 5  # angular harmonics 0..4 of the jitter field
_NBINS = 720  # angle table resolution of the jitter field (0.5 degree)

__all__ = ["STYLES", "SyntheticBatch", "SyntheticDataset", "generate", "list_cases", "rater_names"]


def rater_names(num_raters: int) -> list[str]:
    """``r0-over``, ``r1-under``, ``r2-smooth``, ``r3-thin-miss``, ``r4-over`` ... (styles cycle)."""
    return [f"r{r}-{STYLES[r % len(STYLES)]}" for r in range(num_raters)]


@dataclass
class SyntheticBatch:
    """A batch of synthetic cases.

    Attributes:
        images: ``(B, C, H, W)`` float32 in [0, 1].
        masks: ``(B, R, H, W)`` bool, the sampled annotations (one per rater).
        probs: ``(B, R, H, W)`` float32, each rater's probability map (None when ``with_truth=False``).
        expected: ``(B, R, H, W)`` bool, each rater's expected mask (``probs > 0.5``).
        truth: ``(B, H, W)`` bool, the lesion the image was rendered from.
        ambiguity: ``(B,)`` float32 in [0, 1].
        indices: ``(B,)`` int64 case indices. rater_names: ``R`` names (style in the name).
    """

    images: np.ndarray
    masks: np.ndarray
    probs: np.ndarray | None
    expected: np.ndarray | None
    truth: np.ndarray
    ambiguity: np.ndarray
    indices: np.ndarray
    rater_names: list[str]


# ---- counter-based random numbers ------------------------------------------------------------------------------
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array (wrap-around arithmetic is intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _keys(seed: int, indices: np.ndarray) -> np.ndarray:
    s = _mix(np.full(indices.shape, np.uint64(seed & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64) + _G)
    return _mix(s ^ (indices.astype(np.uint64) * _G + np.uint64(1)))


def _uniform(keys: np.ndarray, stream: int, n: int) -> np.ndarray:
    """``(B, n)`` float32 uniforms in (0, 1), element ``j`` of case ``b`` a function of ``(key_b, stream, j)``."""
    ctr = (np.uint64(stream) << np.uint64(40)) + np.arange(n, dtype=np.uint64)
    z = _mix((keys[:, None] ^ ctr[None, :]) * _G + _G)
    u = ((z >> np.uint64(40)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)
    return u


def _normal(keys: np.ndarray, stream: int, n: int) -> np.ndarray:
    """``(B, n)`` float32 standard normals (Box-Muller on counter uniforms)."""
    m = (n + 1) // 2
    u = _uniform(keys, stream, 2 * m)
    r = np.sqrt(-2.0 * np.log(u[:, :m]))
    t = np.float32(2 * np.pi) * u[:, m:]
    return np.concatenate([r * np.cos(t), r * np.sin(t)], axis=1)[:, :n]


_BANK_BITS = 20
_bank: np.ndarray | None = None


def _pixel_noise(keys: np.ndarray, stream: int, n: int) -> np.ndarray:
    """``(B, n)`` float32 standard normal pixel noise, a function of ``(key_b, stream)``.

    Case ``b`` reads a fixed bank of 2**20 normals (drawn once from ``default_rng(20251127)``) along an
    arithmetic progression ``start_b + j * stride_b (mod 2**20)`` with a hashed start and odd stride: one gather
    per pixel instead of hashing every pixel, and two cases share a value at the same pixel with probability
    ~2**-20.
    """
    global _bank
    if _bank is None:
        _bank = np.random.default_rng(20251127).standard_normal(1 << _BANK_BITS, dtype=np.float32)
    mask = (1 << _BANK_BITS) - 1
    h = _mix(keys ^ np.uint64((stream * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF))
    start = (h & np.uint64(mask)).astype(np.int64)
    stride = ((h >> np.uint64(32)) & np.uint64(mask)).astype(np.int64) | 1
    idx = (start[:, None] + np.arange(n, dtype=np.int64)[None, :] * stride[:, None]) & mask
    return np.take(_bank, idx)


def _ndtr(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF, float32: ``0.5 * erfc(-z / sqrt 2)`` with the Abramowitz-Stegun 7.1.26 rational
    approximation of erf (absolute error < 1.5e-7); arithmetic and one exp only (no gathers)."""
    x = np.abs(z) * np.float32(1 / np.sqrt(2.0))
    t = 1 / (1 + np.float32(0.3275911) * x)
    poly = t * (np.float32(0.254829592) + t * (np.float32(-0.284496736) + t * (
        np.float32(1.421413741) + t * (np.float32(-1.453152027) + t * np.float32(1.061405429)))))
    half_tail = np.float32(0.5) * poly * np.exp(-x * x)  # = 0.5 * erfc(|z| / sqrt 2) = Phi(-|z|)
    return np.where(z >= 0, 1 - half_tail, half_tail).astype(np.float32, copy=False)


# ---- generator -------------------------------------------------------------------------------------------------
_CHUNK = 16  # cases per internal block: keeps the (B, H, W) temporaries cache-sized


def generate(
    indices: np.ndarray | range | list[int] | int,
    *,
    seed: int = 0,
    size: int = 64,
    num_raters: int = 4,
    channels: int = 1,
    with_truth: bool = True,
) -> SyntheticBatch:
    """Generate the cases ``indices`` (an int ``n`` means ``range(n)``). See the module docstring."""
    if isinstance(indices, int):
        indices = range(indices)
    idx = np.asarray(list(indices) if isinstance(indices, range) else indices, dtype=np.int64).reshape(-1)
    if num_raters < 1 or channels < 1 or size < 8:
        raise DataError(f"synthetic: need num_raters (--raters) >= 1, channels (--image-channels) >= 1 and size "
                        f"(--size) >= 8, got {num_raters}, {channels} and {size}")
    parts = [
        _generate_block(idx[i : i + _CHUNK], seed, size, num_raters, channels, with_truth)
        for i in range(0, max(len(idx), 1), _CHUNK)
    ]
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> Any:
        vals = [getattr(p, name) for p in parts]
        return None if vals[0] is None else np.concatenate(vals)

    return SyntheticBatch(
        images=cat("images"), masks=cat("masks"), probs=cat("probs"), expected=cat("expected"),
        truth=cat("truth"), ambiguity=cat("ambiguity"), indices=idx, rater_names=parts[0].rater_names,
    )


def _generate_block(
    idx: np.ndarray, seed: int, size: int, num_raters: int, channels: int, with_truth: bool
) -> SyntheticBatch:
    keys = _keys(seed, idx)
    u = _uniform(keys, 0, _NPARAM)  # (B, P) per-case scalar parameters
    amb = u[:, 0].astype(np.float32)
    shape = _lesion(u, size)
    images = _render(u, keys, shape.d_full, amb, channels)
    masks, probs, expected = _annotate(keys, shape, amb, num_raters, with_truth)
    return SyntheticBatch(
        images=images,
        masks=masks,
        probs=probs,
        expected=expected,
        truth=shape.d_full < 0,
        ambiguity=amb,
        indices=idx,
        rater_names=rater_names(num_raters),
    )


def _param(u: np.ndarray, j: int, lo: float, hi: float) -> np.ndarray:
    """Per-case parameter ``j`` mapped to ``[lo, hi)``, shaped ``(B, 1, 1)`` to broadcast over the pixels."""
    return (lo + (hi - lo) * u[:, j]).astype(np.float32)[:, None, None]


@dataclass
class _Lesion:
    """The lesion of each case as signed distances ``(B, H, W)`` float32 (px, negative inside), and the pixel
    offsets ``dy``, ``dx`` from its centre."""

    dy: np.ndarray
    dx: np.ndarray
    d_full: np.ndarray  # body with every harmonic, plus the protrusions
    d_smooth: np.ndarray  # body with harmonic 2 only, plus the protrusions
    d_body: np.ndarray  # body with every harmonic, no protrusions


def _lesion(u: np.ndarray, hw: int) -> _Lesion:
    """Ellipse modulated by radius harmonics 2..5, plus 0-2 thin protrusions (module docstring)."""
    f32 = np.float32
    cy, cx = _param(u, 1, 0.38, 0.62) * hw, _param(u, 2, 0.38, 0.62) * hw
    ax = _param(u, 3, 0.07, 0.17) * hw
    bx = ax * _param(u, 4, 0.6, 1.0)
    th = _param(u, 5, 0.0, np.pi)
    yy, xx = np.meshgrid(np.arange(hw, dtype=f32) + 0.5, np.arange(hw, dtype=f32) + 0.5, indexing="ij")
    dy, dx = yy[None] - cy, xx[None] - cx  # (B, H, W)
    ct, st = np.cos(th), np.sin(th)
    un = (dx * ct + dy * st) / ax
    vn = (-dx * st + dy * ct) / bx
    rho = np.sqrt(un * un + vn * vn) + f32(1e-6)
    z1 = (un + 1j * vn).astype(np.complex64) / rho  # e^{i phi}
    zk = z1 * z1
    rad = np.ones_like(rho)
    rad_low = np.ones_like(rho)
    for k in range(2, 6):  # body harmonics 2..5 (constant small loop, not over batch/raters)
        eps = _param(u, 4 + k, 0.0, 0.16 / (k - 1))
        psi = _param(u, 8 + k, 0.0, 2 * np.pi)
        term = eps * (zk.real * np.cos(psi) - zk.imag * np.sin(psi))
        rad += term
        if k == 2:
            rad_low += term
        zk = zk * z1
    rmean = np.sqrt(ax * bx)
    d_body = (rho - rad) * rmean
    d_low = (rho - rad_low) * rmean
    d_thin = _protrusions(u, dy, dx, rmean, np.maximum(ax, bx))
    return _Lesion(dy, dx, np.minimum(d_body, d_thin), np.minimum(d_low, d_thin), d_body)


def _protrusions(u: np.ndarray, dy: np.ndarray, dx: np.ndarray, rmean: np.ndarray, rmax: np.ndarray) -> np.ndarray:
    """Signed distance ``(B, H, W)`` to the 0-2 thin capsules running from inside the body outwards (inf: none)."""
    d_thin = np.full_like(dy, np.inf)
    for p in range(2):
        on = u[:, 15 + 4 * p] < (0.7 if p == 0 else 0.35)
        alpha = _param(u, 16 + 4 * p, 0.0, 2 * np.pi)
        length = _param(u, 17 + 4 * p, 0.5, 1.1) * rmax
        half_w = _param(u, 18 + 4 * p, 0.8, 2.0)
        ey, ex = np.sin(alpha), np.cos(alpha)
        sy, sx = 0.5 * rmean * ey, 0.5 * rmean * ex
        ly, lx = (rmax + length) * ey - sy, (rmax + length) * ex - sx
        t = np.clip(((dy - sy) * ly + (dx - sx) * lx) / (ly * ly + lx * lx), 0.0, 1.0)
        dist = np.sqrt((dy - sy - t * ly) ** 2 + (dx - sx - t * lx) ** 2) - half_w
        d_thin = np.minimum(d_thin, np.where(on[:, None, None], dist, np.inf))
    return d_thin


def _render(u: np.ndarray, keys: np.ndarray, d_full: np.ndarray, amb: np.ndarray, channels: int) -> np.ndarray:
    """The images ``(B, C, H, W)`` float32 in [0, 1]: background + texture + blurred lesion + pixel noise."""
    f32 = np.float32
    b, hw = d_full.shape[0], d_full.shape[-1]
    a3 = amb[:, None, None]
    blur = f32(0.6) + f32(3.5) * a3
    inside = 1.0 / (1.0 + np.exp(np.clip(d_full / blur, -30, 30)))
    bg = _param(u, 24, 0.15, 0.35)
    contrast = _param(u, 25, 0.35, 0.55) * (1 - 0.6 * a3)
    tex = np.zeros_like(d_full)
    ax1 = np.arange(hw, dtype=f32) + f32(0.5)
    for w in range(3):  # plane waves cos(a y + c x + p), separable: outer products of (B,H,1) and (B,1,W)
        fy, fx = _param(u, 26 + 3 * w, -0.06, 0.06), _param(u, 27 + 3 * w, -0.06, 0.06)
        ay = f32(2 * np.pi) * fy * ax1[None, :, None]
        axx = f32(2 * np.pi) * fx * ax1[None, None, :] + _param(u, 28 + 3 * w, 0, 2 * np.pi)
        tex += f32(0.025) * (np.cos(ay) * np.cos(axx) - np.sin(ay) * np.sin(axx))
    noise_sd = (f32(0.02) + f32(0.08) * a3)[:, None]
    factors = np.array([1.0, 0.7, -0.6, 0.5], f32)[np.arange(channels) % 4][None, :, None, None]
    noise = _pixel_noise(keys, 1, channels * hw * hw).reshape(b, channels, hw, hw)
    images = bg[:, None] + tex[:, None] + factors * contrast[:, None] * inside[:, None] + noise_sd * noise
    return np.clip(images, 0.0, 1.0).astype(f32)


def _annotate(
    keys: np.ndarray, lesion: _Lesion, amb: np.ndarray, num_raters: int, with_truth: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Each rater's sampled mask ``(B, R, H, W)`` bool, and with ``with_truth`` its probability map and
    expected mask: ``d_r + sigma * n_r < 0``, ``Phi(-d_r / sigma)``, ``d_r < 0`` (module docstring)."""
    f32 = np.float32
    b, hw = lesion.d_full.shape[0], lesion.d_full.shape[-1]
    styles = np.arange(num_raters) % len(STYLES)
    delta = f32(1.6) * (1 + 0.5 * (np.arange(num_raters) // len(STYLES))).astype(f32)
    base_idx = np.array([0, 0, 1, 2])[styles]  # over/under -> d_full, smooth -> d_smooth, thin-miss -> d_body
    offset = np.where(styles == 0, -delta, np.where(styles == 1, delta, 0)).astype(f32)
    bases = np.stack([lesion.d_full, lesion.d_smooth, lesion.d_body], axis=1)  # (B, 3, H, W)
    d_r = bases[:, base_idx] + offset[None, :, None, None]  # (B, R, H, W)
    # jitter n_r(phi): evaluated on a table of _NBINS angles (exactly N(0,1) at each), looked up per pixel
    phi_tab = np.arange(_NBINS, dtype=f32) * f32(2 * np.pi / _NBINS)
    basis = [np.ones_like(phi_tab)]
    for k in range(1, _JITTER_K):
        basis += [np.cos(k * phi_tab), np.sin(k * phi_tab)]
    coef = _normal(keys, 2, num_raters * (2 * _JITTER_K - 1)).reshape(b, num_raters, 2 * _JITTER_K - 1)
    table = (coef / f32(np.sqrt(_JITTER_K))) @ np.stack(basis)  # (B, R, NBINS)
    phi = np.arctan2(lesion.dy, lesion.dx)  # (B, H, W) in [-pi, pi]
    bins = (np.rint(phi * f32(_NBINS / (2 * np.pi))).astype(np.int32) % _NBINS).reshape(b, 1, hw * hw)
    offs = (np.arange(b * num_raters, dtype=np.int32) * _NBINS).reshape(b, num_raters, 1)
    jitter = np.take(table.reshape(-1), offs + bins).reshape(b, num_raters, hw, hw)
    sigma = (f32(0.4) + f32(2.6) * amb)[:, None, None, None]
    masks = (d_r + sigma * jitter) < 0
    if not with_truth:
        return masks, None, None
    return masks, _ndtr(-d_r / sigma), d_r < 0


def _case_id(i: int) -> str:
    return f"synth-{i:05d}"


def list_cases(
    seed: int = 0, cases: int = 200, size: int = 64, num_raters: int = 4, channels: int = 1, chunk: int = 256
) -> list[CaseRef]:
    """Cases for ``prepare synthetic``: generated now in vectorized chunks, one patient per case."""
    if cases < 1:
        raise DataError(f"synthetic: --cases must be at least 1, got {cases}")
    out = []
    for start in range(0, cases, chunk):
        batch = generate(range(start, min(cases, start + chunk)), seed=seed, size=size, num_raters=num_raters,
                         channels=channels, with_truth=False)
        for j, i in enumerate(batch.indices.tolist()):
            s = Sample(
                image=batch.images[j],
                masks=batch.masks[j],
                rater_present=np.ones(num_raters, bool),
                case_id=_case_id(i),
                patient_id=_case_id(i),
                rater_names=batch.rater_names,
                source=f"synthetic seed={seed}",
                extra={"source_dtype": "float32", "ambiguity": float(batch.ambiguity[j])},
            )
            out.append(CaseRef(s.case_id, s.patient_id, (lambda s=s: s)))
    return out


class SyntheticDataset:
    """The synthetic source as a torch-style map Dataset (each item generated on demand from ``(seed, index)``).

    Items: ``{"image": (C,H,W) float32, "masks": (R,H,W) float32 {0,1}, "rater_present": (R,) bool,
    "index": int, "probs": (R,H,W) float32, "ambiguity": float}`` as torch tensors, the same keys as
    ``MultiRaterDataset`` plus the generative truth. ``augment`` (an ``AugmentConfig``) is applied like there
    (the truth maps are not augmented, so leave it None when oracle scores are wanted).
    """

    def __init__(
        self,
        num_cases: int,
        seed: int = 0,
        size: int = 64,
        num_raters: int = 4,
        channels: int = 1,
        augment: AugmentConfig | None = None,
    ) -> None:
        self.num_cases, self.seed, self.size = num_cases, seed, size
        self.num_raters, self.channels, self.augment = num_raters, channels, augment
        self.rater_names = rater_names(num_raters)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_cases

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        if not 0 <= index < self.num_cases:
            raise IndexError(index)
        bt = generate([index], seed=self.seed, size=self.size, num_raters=self.num_raters,
                      channels=self.channels, with_truth=True)
        image, masks = bt.images[0], bt.masks[0].astype(np.float32)
        if self.augment is not None:
            image, masks = augment_item(image, masks, self.augment, self.seed, self.epoch, index)
        assert bt.probs is not None
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "masks": torch.from_numpy(np.ascontiguousarray(masks)),
            "rater_present": torch.ones(self.num_raters, dtype=torch.bool),
            "index": int(index),
            "probs": torch.from_numpy(bt.probs[0]),
            "ambiguity": float(bt.ambiguity[0]),
        }
