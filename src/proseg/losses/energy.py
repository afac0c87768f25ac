"""The energy score of a set of sampled segmentations against one mask: a proper scoring rule that rewards
samples whose spread matches the spread of the outcome (Gneiting & Raftery 2007), the training-time analogue of the
GED the field reports.

For K samples ``p_1..p_K`` (probability maps of one (image, rater) pair) and the rater's mask ``y``, with the
pixel-wise absolute difference as the distance,

    ES = mean_k sum_px |p_k - y|  -  1/2 * mean_{k != l} sum_px |p_k - p_l|.

Per pixel with outcome ``y ~ Bernoulli(q)`` and binary samples of rate ``pi`` this is ``(pi - q)^2 + q(1 - q)``:
its minimum is at ``pi = q``, so the samples are pushed to be sharp where the outcome is certain and to *disagree*
where it is not (a deterministic prediction ``p`` only reaches ``|p - y|``, i.e. ``q(1 - q)`` more). The first term
alone is an L1 segmentation loss; the second is what makes the sample spread pay.

Normalisation: the sums are over pixels and pairs, divided by the total mask area of the batch's used pairs (each
pair counts at least one pixel), so the term has the scale of a Dice-type loss and an empty mask still penalises
false positives. The normaliser depends only on the targets, which keeps the rule proper.
"""

from __future__ import annotations

from torch import Tensor


def energy_score(probs: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Energy score of K >= 2 samples per pair (see the module docstring).

    Args:
        probs: ``(S, K, *spatial)`` sample probabilities (sigmoid outputs) for S (image, rater) pairs.
        target: ``(S, *spatial)`` masks in [0, 1].
        weight: ``(S,)`` non-negative pair weights (0 = an absent rater or an unused pair); None = 1.

    Returns:
        A scalar ``sum_s w_s ES_s / sum_s w_s max(|y_s|, 1)``; 0 when every weight is 0.

    Raises:
        ValueError: fewer than 2 samples, or mismatched shapes.
    """
    if probs.ndim < 3 or probs.shape[1] < 2:
        raise ValueError(f"energy_score needs probs of shape (S, K >= 2, ...), got {tuple(probs.shape)}")
    if target.shape != probs.shape[:1] + probs.shape[2:]:
        raise ValueError(f"target must be {tuple(probs.shape[:1] + probs.shape[2:])}, got {tuple(target.shape)}")
    S, K = probs.shape[:2]
    p = probs.float().reshape(S, K, -1)
    y = target.float().reshape(S, 1, -1)
    fit = (p - y).abs().sum(-1).mean(1)  # (S,)
    # mean over ordered pairs k != l = sum over k < l divided by K(K-1)/2
    spread = p.new_zeros(S)
    for k in range(K - 1):  # K is small (2-4): K-1 vectorised differences
        spread = spread + (p[:, k:k + 1] - p[:, k + 1:]).abs().sum(-1).sum(1)
    spread = spread / (K * (K - 1) / 2)
    es = fit - 0.5 * spread
    w = p.new_ones(S) if weight is None else weight.to(p.dtype)
    area = y.reshape(S, -1).sum(-1).clamp_min(1.0)
    return (es * w).sum() / (area * w).sum().clamp_min(1e-12)
