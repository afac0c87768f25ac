"""Collective Insight (CI) score of CIMD (Rahman et al., "Ambiguous Medical Image Segmentation using
Diffusion Models", CVPR 2023, arXiv 2304.04745, Sec. 3).

Source used. CIMD never released code for the CI score (its repository's issues #2 and #16 ask for it), and
the paper's own text could not be retrieved where this module was written. The definitions below follow the
paper's formulas as rendered by two independent public re-implementations that cite arXiv 2304.04745 (found
by code search; one NumPy script with Korean comments, one ``collective_insight`` function in a diffusion
segmentation code base) and the project's reference note (``proseg-and-peers.md`` §2). Both agree on
``S_c``, ``D_max``, the ``ΔV_max/ΔV_min`` form of ``D_a`` with ``V`` = variance of the pairwise difference
maps, and on ``CI = 3·S_c·D_max·D_a / (S_c + D_max + D_a)``; they differ only in whether the ``i = i′``
pairs enter ``V`` (one includes them, which forces ``min V = 0`` on both sides); here only ``i < i′``.
Where the sources are silent (empty sets, a single mask) the rule chosen is stated explicitly.

Definitions, for labels ``Y_1..Y_N`` and predictions ``Ŷ_1..Ŷ_M`` binarised with ``> 0.5``:

- Combined sensitivity ``S_c = TP / (TP + FN)`` between the union of the labels ``Y_c = ∪ Y_i`` and the
  union of the predictions ``Ŷ_c = ∪ Ŷ_j``. When ``Y_c`` is empty there is nothing to miss: ``S_c = 1``.
- Maximum Dice matching ``D_max = mean_i max_j Dice(Y_i, Ŷ_j)`` (for each label its best prediction; the
  same quantity as ``dice_max_reverse``), with Dice(∅, ∅) = 1.
- Diversity agreement ``D_a = 1 − (ΔV_max + ΔV_min) / 2`` with ``ΔV_max = |max V_Y − max V_Ŷ|`` and
  ``ΔV_min = |min V_Y − min V_Ŷ|``, where ``V_Y`` is the set of *pairwise variances*
  ``Var_pixels(Y_i − Y_{i′})`` over the pairs ``i < i′`` (population variance over all ``P`` pixels of the
  difference map, values in ``{−1, 0, 1}``), and likewise ``V_Ŷ``. A set with a single mask has no pair;
  its pairwise variances are taken as ``{0}`` (no diversity).
- ``CI = 3·S_c·D_max·D_a / (S_c + D_max + D_a)`` as the sources above give it. It is described as a
  harmonic-mean form, but it is not the textbook harmonic mean ``3 / (1/S_c + 1/D_max + 1/D_a)`` (both equal
  1 when the three terms are 1; for three equal terms ``x`` it gives ``x²``). ``CI = 0`` when the
  denominator is 0.

The pairwise variances come from the Gram matrix: for binary ``a, b`` with ``|a| = s_a``, ``|b| = s_b``,
``|a ∩ b| = c``, ``Var(a − b) = (s_a + s_b − 2c)/P − ((s_a − s_b)/P)²``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from proseg.metrics.inputs import flatten_cases
from proseg.metrics.pairwise import pairwise_dice, pairwise_intersections


class CIScore(NamedTuple):
    """CI score and its three components, float64 tensors of shape ``(...)``."""

    ci: torch.Tensor
    combined_sensitivity: torch.Tensor
    d_max: torch.Tensor
    diversity_agreement: torch.Tensor


def pairwise_difference_variance(
    masks: torch.Tensor, inter: torch.Tensor | None = None, num_pixels: int | None = None
) -> torch.Tensor:
    """``V[..., i, j] = Var_pixels(masks_i − masks_j)`` for 0/1 masks ``(..., K, P)`` -> ``(..., K, K)`` float64.

    ``num_pixels`` is the image size when ``masks`` were restricted to a subset of pixels that holds every
    foreground pixel (the variance is over the whole image); default ``P``.
    """
    if inter is None:
        inter = pairwise_intersections(masks, masks)
    p = masks.shape[-1] if num_pixels is None else num_pixels
    size = torch.diagonal(inter, dim1=-2, dim2=-1)  # |m_i ∩ m_i| = |m_i|
    s_i = size.unsqueeze(-1)
    s_j = size.unsqueeze(-2)
    return (s_i + s_j - 2.0 * inter) / p - ((s_i - s_j) / p) ** 2


def _extreme_pair_variances(
    masks: torch.Tensor, inter: torch.Tensor | None, num_pixels: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, min) of the pairwise variances over the pairs ``i < j``; (0, 0) for a single mask."""
    k = masks.shape[-2]
    v = pairwise_difference_variance(masks, inter, num_pixels)
    if k < 2:
        zero = torch.zeros(v.shape[:-2], dtype=torch.float64, device=v.device)
        return zero, zero
    iu = torch.triu_indices(k, k, offset=1, device=v.device)
    pairs = v[..., iu[0], iu[1]]
    return pairs.amax(-1), pairs.amin(-1)


def ci_from_flat(
    labels: torch.Tensor,
    preds_binary: torch.Tensor,
    d: torch.Tensor | None = None,
    *,
    inter_labels: torch.Tensor | None = None,
    inter_preds: torch.Tensor | None = None,
    num_pixels: int | None = None,
) -> CIScore:
    """CI score from flattened 0/1 masks ``(..., N, P)`` and ``(..., M, P)``.

    Args:
        labels: ``(..., N, P)`` 0/1 floats.
        preds_binary: ``(..., M, P)`` 0/1 floats.
        d: optional precomputed standard-convention Dice matrix ``(..., N, M)``.
        inter_labels: optional precomputed ``labels ∩ labels`` counts ``(..., N, N)``.
        inter_preds: optional precomputed ``preds ∩ preds`` counts ``(..., M, M)``.
        num_pixels: the image size when the masks were restricted to a pixel subset holding every foreground
            pixel of both sets (default ``P``).
    """
    union_l = labels.amax(-2)
    union_p = preds_binary.amax(-2)
    tp = (union_l * union_p).sum(-1).to(torch.float64)
    pos = union_l.sum(-1).to(torch.float64)  # TP + FN
    s_c = torch.where(pos > 0, tp / pos.clamp_min(1.0), torch.ones_like(pos))
    if d is None:
        d = pairwise_dice(labels, preds_binary, "standard", inter=pairwise_intersections(labels, preds_binary))
    d_max = d.amax(-1).mean(-1)
    vmax_l, vmin_l = _extreme_pair_variances(labels, inter_labels, num_pixels)
    vmax_p, vmin_p = _extreme_pair_variances(preds_binary, inter_preds, num_pixels)
    d_a = 1.0 - ((vmax_l - vmax_p).abs() + (vmin_l - vmin_p).abs()) / 2.0
    denom = s_c + d_max + d_a
    ci = torch.where(denom > 0, 3.0 * s_c * d_max * d_a / torch.where(denom > 0, denom, 1.0), torch.zeros_like(denom))
    return CIScore(ci, s_c, d_max, d_a)


def ci_score(labels: object, preds: object, *, batched: bool = False) -> CIScore:
    """CIMD's CI score of one case (or a batch of cases).

    Args:
        labels: ``(N, *S)`` binary masks (``(B, N, *S)`` with ``batched``).
        preds: ``(M, *S)`` probabilities (binarised with ``> 0.5``) or binary masks.
        batched: leading case dimension present.

    Returns:
        :class:`CIScore` (``ci``, ``combined_sensitivity``, ``d_max``, ``diversity_agreement``).
    """
    flat = flatten_cases(labels, preds, batched=batched)
    return ci_from_flat(flat.labels, flat.preds_binary)
