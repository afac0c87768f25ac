"""The reduction every loss term shares: a weighted mean over (image, rater) pairs, absent pairs weighing 0."""

from __future__ import annotations

from torch import Tensor


def weighted_mean(values: Tensor, weight: Tensor) -> Tensor:
    """``sum(values * weight) / sum(weight)`` over all elements; 0 when every weight is 0.

    Args:
        values: per-pair values (any shape); weight: same shape (or broadcastable), non-negative, usually 0/1
            (0 = an absent rater or an unused pair). Pass it in the dtype the product should have.
    """
    return (values * weight).sum() / weight.sum().clamp(min=1e-12)
