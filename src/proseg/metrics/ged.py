"""Generalised energy distance (GED) between a set of labels and a set of predictions.

``GED = 2·E[d(P, A)] − E[d(A, A′)] − E[d(P, P′)]`` with ``d = 1 − IoU`` of the foreground, predictions
binarised with ``> 0.5``. The three expectations are returned as well: ``cross`` (``d_pa``), ``labels``
(``d_aa``) and ``preds`` (``d_pp``), the decomposition of ProSeg's Table 9.

Estimators of the two within-set expectations (``estimator``):

- ``"v"`` (V-statistic, default; what the published D-Persona/ProSeg and PHiSeg code compute): the mean
  over all ``N²`` (``M²``) ordered pairs, *including* ``i = i′``. Under ``convention="standard"`` the
  self-pairs are at distance 0, which lowers the diversity terms, and ``GED(X, X) = 0`` exactly.
- ``"u"`` (U-statistic): the mean over the ``N(N−1)`` pairs with ``i ≠ i′``, the unbiased estimator of
  the energy distance. With a single label (prediction) the within-set term is undefined and NaN.

Empty masks (``convention``): ``"standard"`` IoU(∅, ∅) = 1 (distance 0; PHiSeg's rule);
``"reference"`` reproduces ``lib/metrics_set.py`` of D-Persona/ProSeg, where IoU(∅, ∅) = 0, i.e. two
empty masks — including an empty mask and *itself* on the diagonal — are at distance 1.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch

from proseg.metrics.inputs import flatten_cases
from proseg.metrics.pairwise import Convention, check_convention, pairwise_intersections, pairwise_iou

Estimator = Literal["v", "u"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)


def check_estimator(estimator: str) -> None:
    """Raise ``ValueError`` unless ``estimator`` is one of :data:`ESTIMATORS`."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


class GEDTerms(NamedTuple):
    """GED and its three terms; each a float64 tensor of shape ``()`` or ``(B,)``."""

    ged: torch.Tensor
    cross: torch.Tensor
    labels: torch.Tensor
    preds: torch.Tensor


def mean_pair_distance(dist: torch.Tensor, estimator: Estimator) -> torch.Tensor:
    """Mean of a square within-set distance matrix ``(..., K, K)`` under the V or U estimator -> ``(...)``."""
    check_estimator(estimator)
    k = dist.shape[-1]
    if estimator == "v":
        return dist.mean(dim=(-1, -2))
    if k < 2:
        return torch.full(dist.shape[:-2], float("nan"), dtype=dist.dtype, device=dist.device)
    off = dist.sum(dim=(-1, -2)) - torch.diagonal(dist, dim1=-2, dim2=-1).sum(-1)
    return off / (k * (k - 1))


def ged_from_flat(
    labels: torch.Tensor,
    preds_binary: torch.Tensor,
    convention: Convention = "standard",
    estimator: Estimator = "v",
    *,
    intersections: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> GEDTerms:
    """GED from flattened 0/1 masks.

    Args:
        labels: ``(..., N, P)`` 0/1 floats (see :func:`proseg.metrics.pairwise.as_counting`).
        preds_binary: ``(..., M, P)`` 0/1 floats, same dtype.
        convention: ``"standard"`` or ``"reference"`` (empty-mask rule, see the module docstring).
        estimator: ``"v"`` or ``"u"``.
        intersections: optional precomputed ``(labels∩preds (..., N, M), labels∩labels (..., N, N),
            preds∩preds (..., M, M))`` from :func:`proseg.metrics.pairwise.pairwise_intersections`.

    Returns:
        :class:`GEDTerms` with shapes ``(...)``.
    """
    check_convention(convention)
    check_estimator(estimator)
    if intersections is None:
        intersections = (
            pairwise_intersections(labels, preds_binary),
            pairwise_intersections(labels, labels),
            pairwise_intersections(preds_binary, preds_binary),
        )
    i_lp, i_ll, i_pp = intersections
    # The mask sizes are the diagonals of the within-set Gram matrices: no further pass over the pixels.
    s_l = torch.diagonal(i_ll, dim1=-2, dim2=-1)
    s_p = torch.diagonal(i_pp, dim1=-2, dim2=-1)
    d_cross = 1.0 - pairwise_iou(labels, preds_binary, convention, inter=i_lp, sizes=(s_l, s_p))
    d_labels = 1.0 - pairwise_iou(labels, labels, convention, inter=i_ll, sizes=(s_l, s_l))
    d_preds = 1.0 - pairwise_iou(preds_binary, preds_binary, convention, inter=i_pp, sizes=(s_p, s_p))
    cross = d_cross.mean(dim=(-1, -2))
    e_labels = mean_pair_distance(d_labels, estimator)
    e_preds = mean_pair_distance(d_preds, estimator)
    return GEDTerms(ged=2.0 * cross - e_labels - e_preds, cross=cross, labels=e_labels, preds=e_preds)


def generalized_energy_distance(
    labels: object,
    preds: object,
    *,
    convention: Convention = "standard",
    estimator: Estimator = "v",
    batched: bool = False,
) -> GEDTerms:
    """GED of one case (or a batch of cases) from masks of any spatial shape.

    Args:
        labels: ``(N, *S)`` binary masks, or ``(B, N, *S)`` with ``batched=True``.
        preds: ``(M, *S)`` probabilities (binarised with ``> 0.5``) or binary masks, or ``(B, M, *S)``.
        convention: ``"standard"`` (IoU(∅,∅) = 1) or ``"reference"`` (D-Persona/ProSeg code, IoU(∅,∅) = 0).
        estimator: ``"v"`` (pairs include ``i = i′``) or ``"u"`` (``i ≠ i′``).
        batched: leading case dimension present.

    Returns:
        :class:`GEDTerms` (``ged``, ``cross``, ``labels``, ``preds``), float64 tensors of shape ``()`` or ``(B,)``.

    Example:
        >>> import torch
        >>> a = torch.zeros(2, 4, 4); a[0, :2] = 1; a[1, :3] = 1
        >>> float(generalized_energy_distance(a, a).ged)
        0.0
    """
    flat = flatten_cases(labels, preds, batched=batched)
    return ged_from_flat(flat.labels, flat.preds_binary, convention, estimator)
