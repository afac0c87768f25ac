"""Pairwise overlap of two sets of binary masks through matrix products.

Everything here works on *flattened* masks: a set of ``N`` masks of spatial shape ``*S`` (2D ``(H, W)`` or
3D ``(D, H, W)``) is a ``(N, P)`` tensor with ``P = prod(S)``, optionally with leading batch dimensions
``(B, N, P)`` (one row of the batch = one case). A 3D volume is one mask: it is scored as a volume, never
per slice.

The intersection counts of every pair are one matrix product ``A @ B.T`` on 0/1 floats, so the memory is
``O((N + M) * P + N * M)``: no ``N x M x P`` tensor is ever built and there is no Python loop over pairs.
The products are exact: 0/1 values and integer partial sums are exact in float32 below ``2**24`` pixels per
mask and in float64 above that (the dtype is chosen accordingly).

Empty-mask conventions (``convention``):

- ``"standard"``: ``IoU(∅, ∅) = 1`` and ``Dice(∅, ∅) = 1``; one empty and one non-empty mask give 0;
  otherwise the exact ratios ``|A∩B| / |A∪B|`` and ``2|A∩B| / (|A| + |B|)``.
- ``"reference"``: the published D-Persona/ProSeg code (``lib/metrics_set.py``):
  ``IoU = |A∩B| / (|A∪B| + 1e-8)`` (so ``IoU(∅, ∅) = 0``: two empty masks are at IoU-distance 1, the
  smoothing term hides the NaN → 1 rule written next to it) and
  ``Dice = (2|A∩B| + 1e-8) / (|A| + |B| + 1e-8)`` (so ``Dice(∅, ∅) = 1``).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

Convention = Literal["standard", "reference"]
CONVENTIONS: tuple[str, ...] = get_args(Convention)

# Smoothing constants of the reference code (lib/metrics_set.py: `iou` and `compute_dice_accuracy`).
REFERENCE_IOU_SMOOTH = 1e-8
REFERENCE_DICE_SMOOTH = 1e-8

# Above this many pixels per mask, float32 can no longer count exactly.
_FLOAT32_EXACT_LIMIT = 2**24


def check_convention(convention: str) -> None:
    """Raise ``ValueError`` unless ``convention`` is one of :data:`CONVENTIONS`."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def count_dtype(num_pixels: int) -> torch.dtype:
    """The float dtype in which 0/1 counting over ``num_pixels`` pixels is exact (the same on CPU and GPU)."""
    return torch.float32 if num_pixels < _FLOAT32_EXACT_LIMIT else torch.float64


def as_counting(masks: torch.Tensor) -> torch.Tensor:
    """Binary masks ``(..., P)`` (bool or 0/1 numbers) -> 0/1 floats in an exact counting dtype."""
    dtype = count_dtype(masks.shape[-1])
    if masks.dtype == torch.bool:
        return masks.to(dtype)
    return (masks != 0).to(dtype)


def mask_sizes(masks: torch.Tensor) -> torch.Tensor:
    """Foreground counts of 0/1 masks ``(..., K, P)`` -> ``(..., K)`` float64.

    Summed in the counting dtype (exact, see :func:`count_dtype`), then cast: no float64 copy of the masks.
    """
    return masks.sum(-1).to(torch.float64)


def pairwise_intersections(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection counts of every pair.

    Args:
        a: ``(..., N, P)`` 0/1 floats (see :func:`as_counting`).
        b: ``(..., M, P)`` 0/1 floats, same leading dims and dtype as ``a``.

    Returns:
        ``(..., N, M)`` float64 tensor: ``|a_i ∩ b_j|``.
    """
    return torch.matmul(a, b.transpose(-1, -2)).to(torch.float64)


def iou_from_counts(inter: torch.Tensor, union: torch.Tensor, convention: Convention) -> torch.Tensor:
    """IoU from intersection and union counts (float64, any shape) under ``convention``'s empty-mask rule."""
    if convention == "reference":
        return inter / (union + REFERENCE_IOU_SMOOTH)
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def dice_from_counts(inter: torch.Tensor, total: torch.Tensor, convention: Convention) -> torch.Tensor:
    """Dice from intersection counts and summed sizes ``|A| + |B|`` (float64, any shape) under ``convention``."""
    if convention == "reference":
        return (2.0 * inter + REFERENCE_DICE_SMOOTH) / (total + REFERENCE_DICE_SMOOTH)
    return torch.where(total > 0, 2.0 * inter / total.clamp_min(1.0), torch.ones_like(total))


def _pair_counts(
    a: torch.Tensor,
    b: torch.Tensor,
    inter: torch.Tensor | None,
    sizes: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(|a_i ∩ b_j| (..., N, M), |a_i| (..., N, 1), |b_j| (..., 1, M))``, from what was precomputed if given."""
    if inter is None:
        inter = pairwise_intersections(a, b)
    size_a, size_b = sizes if sizes is not None else (mask_sizes(a), mask_sizes(b))
    return inter, size_a.unsqueeze(-1), size_b.unsqueeze(-2)


def pairwise_iou(
    a: torch.Tensor,
    b: torch.Tensor,
    convention: Convention = "standard",
    *,
    inter: torch.Tensor | None = None,
    sizes: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """IoU of the foreground of every pair ``(a_i, b_j)``.

    Args:
        a: ``(..., N, P)`` 0/1 floats.
        b: ``(..., M, P)`` 0/1 floats.
        convention: empty-mask rule, see the module docstring.
        inter: precomputed :func:`pairwise_intersections` (optional).
        sizes: precomputed mask sizes ``((..., N), (..., M))`` float64 (optional; see :func:`mask_sizes`).

    Returns:
        ``(..., N, M)`` float64 in ``[0, 1]``.
    """
    check_convention(convention)
    inter, size_a, size_b = _pair_counts(a, b, inter, sizes)
    return iou_from_counts(inter, size_a + size_b - inter, convention)


def pairwise_dice(
    a: torch.Tensor,
    b: torch.Tensor,
    convention: Convention = "standard",
    *,
    inter: torch.Tensor | None = None,
    sizes: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Dice of the foreground of every pair ``(a_i, b_j)``: arguments and result as :func:`pairwise_iou`."""
    check_convention(convention)
    inter, size_a, size_b = _pair_counts(a, b, inter, sizes)
    return dice_from_counts(inter, size_a + size_b, convention)
