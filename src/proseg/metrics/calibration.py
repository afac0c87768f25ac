"""Does the predicted spread carry the raters' disagreement? Diversity ratio, pixel variances, the ambiguity
share of the total variance, and the calibration of the soft mean against the raters' frequency map.

Notation (one case): labels ``A_1..A_N`` (binary, ``(N, *S)``), soft predictions ``p_1..p_M`` (``(M, *S)`` in
``[0, 1]``), ``P`` pixels (voxels: a 3D case is one volume). Per pixel::

    f  = mean_i A_i        the raters' frequency map (fraction of the present raters that marked the pixel)
    p̄  = mean_j p_j        the soft mean (personalized mode: the M = N predictions are the per-rater means, so
                           p̄ is the mean over raters of the raters' means)

Keys of a :func:`proseg.metrics.case_metrics` record computed here (all float; NaN = undefined):

- ``diversity_ratio`` = ``d_pp / d_aa`` = ``ged_preds / ged_labels`` (same convention and estimator as GED).
  1 means the predictions are as diverse (in IoU distance) as the raters; 0 means no diversity. **NaN when
  d_aa == 0** (the raters agree exactly, e.g. all empty under the standard convention): the ratio is undefined,
  and :func:`proseg.metrics.aggregate` leaves it out (its ``n`` counts the cases used).
- ``sample_variance`` = ``mean_pixels Var_j(p_j)`` (population variance over the M soft predictions).
- ``rater_variance`` = ``mean_pixels Var_i(A_i)`` = ``mean_pixels f·(1 − f)`` (population variance of the raters'
  binary masks). A model whose samples are binary draws from the raters has ``sample_variance ≈
  rater_variance``; soft samples have less variance than binary ones with the same mean.
- ``brier`` = ``mean_pixels (p̄ − f)²`` over **all** pixels.
- ``brier_fg`` = the same mean over the region ``R = (∪_i A_i) ∪ {p̄ > 0.05}`` (union of the raters' masks and
  every pixel the soft mean gives more than 0.05); **NaN when R is empty**.
- ``ece`` = expected calibration error with ``B = 10`` equal-width bins of ``p̄`` (bin ``b`` holds ``b/B <= p̄ <
  (b+1)/B``; ``p̄ = 1`` falls in the last bin), weighted by the number of pixels in each bin:
  ``ECE = sum_b (n_b / P) · |mean_{bin b} p̄ − mean_{bin b} f| = sum_b |sum_{bin b} (p̄ − f)| / P``. The bins are
  of the foreground probability ``p̄`` itself (not of the max-class confidence), and the target is the
  frequency ``f`` (with one rater, the usual binary ECE). Empty bins contribute 0.

Empty-mask rule: a case where every rater's mask is empty and the soft mean is 0 everywhere has ``brier = 0`` and
``ece = 0`` (perfectly calibrated: ``p̄ = f = 0`` at every pixel), ``brier_fg = NaN`` (empty region),
``rater_variance = sample_variance = 0``. Nothing is special-cased: these values follow from the formulas.

Why ``brier`` and ``ece`` are over every pixel by default (no region such as a dilated union of the masks):
it is the plain definition, it needs no extra parameter, and it does not depend on the predictions through the
choice of pixels. But the background dominates (a lesion covers a few percent of a slice, where ``p̄ ≈ f ≈ 0``),
so both are small for any sensible model; ``brier_fg`` is reported beside them for that reason.

Personalized samples ``(R, K, *S)`` (R raters, K samples each) have the law-of-total-variance split of
:mod:`proseg.metrics.uncertainty`; :func:`ambiguity_share` = ``sum_pixels ambiguity / sum_pixels total``, the
fraction of the total variance that is within-rater (ambiguity) rather than between the raters' means.
It needs the raw samples, so it is not part of :func:`proseg.metrics.case_metrics` (the evaluation loop adds it
to the personalized records).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from proseg.metrics.inputs import flatten_cases, to_tensor

NUM_BINS = 10
"""Equal-width bins of the soft mean for :func:`calibration` (ECE)."""
FG_THRESHOLD = 0.05
"""``brier_fg`` region: the union of the raters' masks and the pixels with soft mean ``> FG_THRESHOLD``."""
# ambiguity_share is NaN when the total variance is 0: below this per-pixel mean (rounding of a constant set).
_ZERO_VARIANCE = 1e-12


class Calibration(NamedTuple):
    """``brier``, ``brier_fg``, ``ece``: float64 tensors of shape ``()`` or ``(B,)``."""

    brier: torch.Tensor
    brier_fg: torch.Tensor
    ece: torch.Tensor


class PixelVariances(NamedTuple):
    """``sample_variance`` (of the soft predictions) and ``rater_variance`` (of the labels), mean over pixels;
    float64 tensors of shape ``()`` or ``(B,)``."""

    sample_variance: torch.Tensor
    rater_variance: torch.Tensor


def calibration_from_flat(
    labels: torch.Tensor,
    preds_soft: torch.Tensor,
    *,
    num_bins: int = NUM_BINS,
    fg_threshold: float = FG_THRESHOLD,
) -> Calibration:
    """Brier score, foreground Brier score and ECE of the soft mean against the frequency map.

    Args:
        labels: ``(..., N, P)`` 0/1 (any float dtype).
        preds_soft: ``(..., M, P)`` probabilities in ``[0, 1]``.
        num_bins: equal-width ECE bins over ``[0, 1]``.
        fg_threshold: ``brier_fg`` takes the pixels with soft mean ``> fg_threshold`` besides the masks' union.

    Returns:
        :class:`Calibration`, each of shape ``(...)``.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    freq = labels.to(torch.float64).mean(-2)  # (..., P)
    mean = preds_soft.to(torch.float64).mean(-2)  # (..., P)
    num_pixels = mean.shape[-1]
    diff = mean - freq
    sq = diff.square()
    brier = sq.mean(-1)
    region = (labels.amax(-2) > 0) | (mean > fg_threshold)
    count = region.sum(-1)
    fg_sum = torch.where(region, sq, torch.zeros_like(sq)).sum(-1)
    brier_fg = torch.where(count > 0, fg_sum / count.clamp_min(1), torch.full_like(fg_sum, float("nan")))
    # sum_b (n_b/P)·|mean_b p̄ − mean_b f| = sum_b |sum_b (p̄ − f)| / P: no division by an empty bin.
    idx = (mean * num_bins).floor().clamp(0, num_bins - 1).long()
    per_bin = torch.zeros((*mean.shape[:-1], num_bins), dtype=torch.float64, device=mean.device)
    per_bin.scatter_add_(-1, idx, diff)
    ece = per_bin.abs().sum(-1) / num_pixels
    return Calibration(brier=brier, brier_fg=brier_fg, ece=ece)


def variances_from_flat(labels: torch.Tensor, preds_soft: torch.Tensor) -> PixelVariances:
    """Mean pixel variance of the soft predictions ``(..., M, P)`` and of the labels ``(..., N, P)`` -> ``(...)``."""
    freq = labels.to(torch.float64).mean(-2)
    p = preds_soft.to(torch.float64)
    # population variance over M, centred explicitly: torch's var over a non-innermost dimension is ~6x slower
    sample = (p - p.mean(-2, keepdim=True)).square_().mean((-2, -1))
    return PixelVariances(sample_variance=sample, rater_variance=(freq * (1.0 - freq)).mean(-1))


def diversity_ratio(d_pp: torch.Tensor | float, d_aa: torch.Tensor | float) -> torch.Tensor:
    """``d_pp / d_aa`` (``ged_preds / ged_labels``) elementwise, NaN where ``d_aa == 0`` (or either is NaN).

    Example:
        >>> float(diversity_ratio(0.3, 0.6)), float(diversity_ratio(0.3, 0.0))
        (0.5, nan)
    """
    pp = torch.as_tensor(d_pp, dtype=torch.float64)
    aa = torch.as_tensor(d_aa, dtype=torch.float64, device=pp.device)
    safe = torch.where(aa == 0, torch.ones_like(aa), aa)
    return torch.where(aa == 0, torch.full_like(safe, float("nan")), pp / safe)


def calibration(
    labels: object,
    preds: object,
    *,
    num_bins: int = NUM_BINS,
    fg_threshold: float = FG_THRESHOLD,
    batched: bool = False,
) -> Calibration:
    """Calibration of one case (or a batch of cases): see the module docstring for the definitions.

    Args:
        labels: ``(N, *S)`` binary masks (``*S`` = ``(H, W)`` or ``(D, H, W)``), or ``(B, N, *S)`` with ``batched``.
        preds: ``(M, *S)`` probabilities in ``[0, 1]`` (or ``(B, M, *S)``); their mean over M is the soft mean.
        num_bins: equal-width ECE bins (default 10).
        fg_threshold: the soft-mean threshold of the ``brier_fg`` region (default 0.05, strict ``>``).
        batched: leading case dimension present.

    Returns:
        :class:`Calibration` (``brier``, ``brier_fg``, ``ece``), float64 of shape ``()`` or ``(B,)``.
        Every rater empty and the soft mean 0 everywhere: ``brier = ece = 0``, ``brier_fg = NaN``.

    Example:
        >>> import torch
        >>> labels = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]])   # f = [[.5, 0], [0, 0]]
        >>> preds = torch.tensor([[[0.5, 0.0], [0.0, 0.0]]])
        >>> [float(v) for v in calibration(labels, preds)]
        [0.0, 0.0, 0.0]
    """
    flat = flatten_cases(labels, preds, batched=batched)
    return calibration_from_flat(flat.labels, flat.preds_soft, num_bins=num_bins, fg_threshold=fg_threshold)


def pixel_variances(labels: object, preds: object, *, batched: bool = False) -> PixelVariances:
    """``sample_variance`` and ``rater_variance`` of one case (or a batch): see the module docstring.

    Args:
        labels: ``(N, *S)`` binary masks, or ``(B, N, *S)`` with ``batched``.
        preds: ``(M, *S)`` probabilities, or ``(B, M, *S)``.

    Returns:
        :class:`PixelVariances`, float64 of shape ``()`` or ``(B,)``.
    """
    flat = flatten_cases(labels, preds, batched=batched)
    return variances_from_flat(flat.labels, flat.preds_soft)


def ambiguity_share(samples: object) -> float:
    """Share of the total variance that is ambiguity (within-rater), over the pixels of one case.

    Args:
        samples: ``(R, K, *S)`` probabilities in ``[0, 1]`` (R raters, K samples each, any spatial shape); NumPy
            or torch.

    Returns:
        ``sum_pixels ambiguity / sum_pixels total`` with the maps of
        :func:`proseg.metrics.uncertainty.uncertainty_maps` (population variances, computed here in float64):
        ``total = Var_{r,k}(p)``, ``ambiguity = mean_r Var_k(p)``, ``total = rater + ambiguity``. In ``[0, 1]``:
        1 when the raters' means agree everywhere, 0 when each rater's K samples are identical. NaN when the
        total variance is 0 (every sample equal at every pixel; below 1e-12 per pixel on average).

    Example:
        >>> import torch
        >>> s = torch.tensor([[[[0.0]], [[1.0]]], [[[0.0]], [[1.0]]]])   # (R=2, K=2, 1, 1): raters' means agree
        >>> ambiguity_share(s)
        1.0
    """
    x = to_tensor(samples, "samples")
    if x.dim() < 3:
        raise ValueError(f"samples must be (R, K, *S), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"samples need at least one rater and one sample, got shape {tuple(x.shape)}")
    x = x.to(torch.float64)
    n = x.shape[0] * x.shape[1]
    # sums over the pixels of total = Var_{r,k} and ambiguity = mean_r Var_k, centred explicitly (torch's var
    # over the leading dimensions is ~5x slower; an evaluation calls this once per case)
    total_sum = float((x - x.mean((0, 1), keepdim=True)).square_().sum()) / n
    ambiguity_sum = float((x - x.mean(1, keepdim=True)).square_().sum()) / n
    if total_sum <= _ZERO_VARIANCE * x[0, 0].numel():
        return float("nan")
    return ambiguity_sum / total_sum
