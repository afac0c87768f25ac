"""Dice-based multi-rater metrics: Dice_soft, Dice_max (both directions), Dice_match, per-rater Dice.

Inputs are flattened (see :mod:`proseg.metrics.inputs`): labels ``(..., N, P)`` 0/1 floats, predictions
binarised with ``> 0.5`` ``(..., M, P)`` for the Dice matrix, and the soft predictions for Dice_soft.
Every Dice here is *volume-level*: a 3D case is one mask of ``D·H·W`` voxels.

``D[i, j] = Dice(label_i, prediction_j)`` (the Dice matrix, :func:`dice_matrix`), with the empty-mask rule
of ``convention``: ``"standard"`` Dice(∅, ∅) = 1 and Dice(∅, x≠∅) = 0 exactly; ``"reference"`` the
published ``(2|A∩B| + 1e-8) / (|A| + |B| + 1e-8)`` (equal to 1 for two empty masks, ~0 for one).

- ``Dice_max`` = ``mean_j max_i D[i, j]``: for each prediction the best label ("many predictions").
- ``Dice_max_reverse`` = ``mean_i max_j D[i, j]``: for each label the best prediction (this is CIMD's
  ``D_max``). The published training loop validates on the mean of both.
- ``Dice_match``: one-to-one Hungarian matching (``scipy.optimize.linear_sum_assignment`` on ``1 − D``),
  mean Dice over the ``min(N, M)`` matched pairs.
- per-rater Dice, *matched*: for rater ``i`` the Dice with the prediction matched to it (NaN when
  ``N > M`` leaves rater ``i`` unmatched). This is the published ``Dice_each`` (``is_test=False``).
- per-rater Dice, *aligned*: ``D[i, i]`` (prediction ``k`` is rater ``k``'s personalized output); only
  defined when ``M == N``.
- ``Dice_soft`` = ``mean_t Dice(mean_j P_j > t, mean_i A_i > t)`` over thresholds ``t`` (default
  ``.1 .3 .5 .7 .9``), on the mean of the *soft* predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from proseg.metrics.inputs import flatten_cases
from proseg.metrics.pairwise import (
    Convention,
    check_convention,
    dice_from_counts,
    pairwise_dice,
    pairwise_intersections,
)

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)


def check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    """Validate Dice_soft thresholds (non-empty, each in ``[0, 1)``) and return them as a tuple."""
    ts = tuple(float(t) for t in thresholds)
    if not ts:
        raise ValueError("thresholds must not be empty")
    if any(not (0.0 <= t < 1.0) for t in ts):
        raise ValueError(f"thresholds must lie in [0, 1); got {ts}")
    return ts


def dice_matrix(labels: torch.Tensor, preds_binary: torch.Tensor, convention: Convention = "standard") -> torch.Tensor:
    """``D[..., i, j] = Dice(labels[..., i, :], preds_binary[..., j, :])`` -> ``(..., N, M)`` float64."""
    return pairwise_dice(labels, preds_binary, convention, inter=pairwise_intersections(labels, preds_binary))


class DiceMax(NamedTuple):
    """``dice_max`` (best label per prediction), ``dice_max_reverse`` (best prediction per label), ``mean``."""

    dice_max: torch.Tensor
    dice_max_reverse: torch.Tensor
    mean: torch.Tensor


def dice_max_from_matrix(d: torch.Tensor) -> DiceMax:
    """Dice_max both ways from a Dice matrix ``(..., N, M)``; each result has shape ``(...)``."""
    forward = d.amax(dim=-2).mean(-1)
    reverse = d.amax(dim=-1).mean(-1)
    return DiceMax(forward, reverse, 0.5 * (forward + reverse))


class DiceMatch(NamedTuple):
    """Hungarian matching of one case.

    Attributes:
        dice_match: mean Dice over the ``min(N, M)`` matched pairs.
        per_rater: ``(N,)`` float64 NumPy array; Dice of rater ``i`` with its matched prediction, NaN
            when unmatched (only possible when ``N > M``).
        assignment: ``(N,)`` int array, matched prediction index per rater, ``-1`` when unmatched.
    """

    dice_match: float
    per_rater: np.ndarray
    assignment: np.ndarray


def dice_match_from_matrix(d: torch.Tensor) -> DiceMatch:
    """One-to-one Hungarian matching on ``1 − D`` for one case's Dice matrix ``(N, M)``."""
    if d.dim() != 2:
        raise ValueError(f"expected one case's Dice matrix (N, M); got shape {tuple(d.shape)}")
    dm = d.detach().to("cpu", torch.float64).numpy()
    rows, cols = linear_sum_assignment(1.0 - dm)
    n = dm.shape[0]
    per_rater = np.full(n, np.nan)
    assignment = np.full(n, -1, dtype=np.int64)
    per_rater[rows] = dm[rows, cols]
    assignment[rows] = cols
    return DiceMatch(float(dm[rows, cols].mean()), per_rater, assignment)


def dice_per_rater_aligned(d: torch.Tensor) -> torch.Tensor | None:
    """``D[..., i, i]`` (prediction ``k`` vs rater ``k``) -> ``(..., N)``; ``None`` unless ``M == N``."""
    if d.shape[-1] != d.shape[-2]:
        return None
    return torch.diagonal(d, dim1=-2, dim2=-1)


def dice_soft_from_flat(
    labels: torch.Tensor,
    preds_soft: torch.Tensor,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    convention: Convention = "standard",
) -> torch.Tensor:
    """Dice_soft from flattened inputs.

    Args:
        labels: ``(..., N, P)`` 0/1 floats.
        preds_soft: ``(..., M, P)`` probabilities.
        thresholds: the ``t`` values (strict ``>``), averaged with equal weight.
        convention: Dice empty-mask rule.

    Returns:
        ``(...)`` float64.
    """
    check_convention(convention)
    ts = check_thresholds(thresholds)
    # Means as the published code takes them (labels.mean(1).float(), preds.mean(1)): label means of 0/1 values
    # are exact in float32, so ties such as 2/4 > 0.5 resolve identically; the prediction mean is taken in
    # the predictions' own precision (a float64 copy of M x P samples would cost more than everything else).
    label_mean = labels.to(torch.float32).mean(-2)
    pred_mean = preds_soft.mean(-2)
    t_label = torch.tensor(ts, dtype=label_mean.dtype, device=labels.device)
    t_pred = torch.tensor(ts, dtype=pred_mean.dtype, device=labels.device)
    lab_t = label_mean.unsqueeze(-2) > t_label.unsqueeze(-1)  # (..., T, P)
    prd_t = pred_mean.unsqueeze(-2) > t_pred.unsqueeze(-1)
    inter = (lab_t & prd_t).sum(-1, dtype=torch.float64)
    total = lab_t.sum(-1, dtype=torch.float64) + prd_t.sum(-1, dtype=torch.float64)
    return dice_from_counts(inter, total, convention).mean(-1)


def dice_soft(
    labels: object,
    preds: object,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    convention: Convention = "standard",
    batched: bool = False,
) -> torch.Tensor:
    """Dice_soft of one case (``labels (N, *S)``, soft ``preds (M, *S)``) or a batch -> ``()`` / ``(B,)`` float64."""
    flat = flatten_cases(labels, preds, batched=batched)
    return dice_soft_from_flat(flat.labels, flat.preds_soft, thresholds, convention)


def dice_max(labels: object, preds: object, *, convention: Convention = "standard", batched: bool = False) -> DiceMax:
    """Dice_max, Dice_max_reverse and their mean for one case (or a batch); predictions binarised with ``> 0.5``."""
    flat = flatten_cases(labels, preds, batched=batched)
    return dice_max_from_matrix(dice_matrix(flat.labels, flat.preds_binary, convention))


def dice_match(labels: object, preds: object, *, convention: Convention = "standard") -> DiceMatch:
    """Hungarian Dice_match of one case: mean matched Dice, per-rater matched Dice (NaN if unmatched), assignment."""
    flat = flatten_cases(labels, preds)
    return dice_match_from_matrix(dice_matrix(flat.labels, flat.preds_binary, convention))
