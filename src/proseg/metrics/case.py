"""All metrics of one case (or of a batch of cases) in one call: the record behind ``proseg score --json``.

``case_metrics(labels, preds, convention=..., estimator=..., thresholds=...)`` returns a plain dict (JSON
ready: Python floats, lists and strings) with exactly these keys, in this order:

``ged``, ``ged_cross``, ``ged_labels``, ``ged_preds``, ``dice_soft``, ``dice_max``, ``dice_max_reverse``,
``dice_match``, ``dice_per_rater_matched`` (list of N), ``dice_per_rater`` (list of N, only when M == N),
``ci_score``, ``s_ncc``, ``diversity_ratio``, ``sample_variance``, ``rater_variance``, ``brier``, ``brier_fg``,
``ece``, ``convention``, ``estimator``, ``num_labels``, ``num_predictions``.

The diversity and calibration keys are defined in :mod:`proseg.metrics.calibration`; they use the soft
predictions and do not depend on the convention except ``diversity_ratio`` (``ged_preds / ged_labels``).

What the convention changes (see :mod:`proseg.metrics.pairwise`): the empty-mask rule and smoothing of the
IoU in GED and of the Dice in Dice_soft / Dice_max / Dice_match / per-rater Dice. ``"reference"`` reproduces
D-Persona/ProSeg's ``lib/metrics_set.py``. The CI score and S_NCC are not in that code and are computed the
same way under both conventions (standard empty-mask rules). NaN marks an undefined value (U-statistic with
one mask, S_NCC of a constant map, per-rater matched Dice of an unmatched rater when N > M, ``diversity_ratio``
when ``ged_labels`` is 0, ``brier_fg`` when its region is empty).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from proseg.metrics.calibration import calibration_from_flat, diversity_ratio, variances_from_flat
from proseg.metrics.ci import ci_from_flat
from proseg.metrics.dice import (
    DEFAULT_THRESHOLDS,
    check_thresholds,
    dice_match_from_matrix,
    dice_max_from_matrix,
    dice_per_rater_aligned,
    dice_soft_from_flat,
)
from proseg.metrics.ged import Estimator, check_estimator, ged_from_flat
from proseg.metrics.inputs import FlatCases, flatten_cases
from proseg.metrics.ncc import s_ncc_from_flat
from proseg.metrics.pairwise import Convention, check_convention, pairwise_dice, pairwise_intersections

SCALAR_KEYS: tuple[str, ...] = (
    "ged",
    "ged_cross",
    "ged_labels",
    "ged_preds",
    "dice_soft",
    "dice_max",
    "dice_max_reverse",
    "dice_match",
    "ci_score",
    "s_ncc",
)
LIST_KEYS: tuple[str, ...] = ("dice_per_rater_matched", "dice_per_rater")
INFO_KEYS: tuple[str, ...] = ("convention", "estimator", "num_labels", "num_predictions")
EXTRA_KEYS: tuple[str, ...] = ("diversity_ratio", "sample_variance", "rater_variance", "brier", "brier_fg", "ece",
                               "empty_labels", "empty_preds")
"""The diversity and calibration keys of every record (:mod:`proseg.metrics.calibration`); may be NaN.
``empty_labels`` / ``empty_preds``: the fraction of the N label masks / of the M predictions binarised at 0.5 (the
record's GED threshold) that are empty, in [0, 1] and never NaN: a sampler that is calibrated about whether there
is a lesion at all has ``empty_preds ≈ empty_labels`` on average."""
SAMPLE_KEYS: tuple[str, ...] = ("ambiguity_share",)
"""Keys that need the raw samples ``(R, K, *S)``, not only the predictions: never in a :func:`case_metrics` record;
the evaluation loop adds them to its personalized records (:func:`proseg.metrics.calibration.ambiguity_share`)."""
METRIC_KEYS: tuple[str, ...] = (*SCALAR_KEYS, *EXTRA_KEYS[:3], *SAMPLE_KEYS, *EXTRA_KEYS[3:])
"""Every scalar metric a record may carry, in the order of ``aggregate`` and the CSV columns."""
RECORD_KEYS: tuple[str, ...] = (*SCALAR_KEYS[:8], *LIST_KEYS, *SCALAR_KEYS[8:], *EXTRA_KEYS, *INFO_KEYS)
"""Every key a record can have, in output order (``dice_per_rater`` only when M == N)."""


# Restrict the mask metrics to the pixels that are foreground somewhere when they are fewer than this fraction
# (below it the copy is cheaper than the matrix products it shrinks).
_COMPACT_BELOW = 0.75


def _records_from_flat(
    flat: FlatCases,
    convention: Convention,
    estimator: Estimator,
    thresholds: tuple[float, ...],
) -> list[dict[str, Any]]:
    labels, preds_b, preds_s = flat.labels, flat.preds_binary, flat.preds_soft
    if labels.dim() == 2:  # single case -> batch of one
        labels, preds_b, preds_s = labels.unsqueeze(0), preds_b.unsqueeze(0), preds_s.unsqueeze(0)
    # Pixels that are background in every mask of every case add nothing to any intersection or size:
    # restrict the mask-based metrics to the others (lesions are small, so this often removes most pixels).
    num_pixels = int(labels.shape[-1])
    active = (labels.amax(-2) + preds_b.amax(-2)).amax(0) > 0  # (P,)
    if int(active.sum()) < _COMPACT_BELOW * num_pixels:
        labels_c, preds_c = labels[..., active], preds_b[..., active]
    else:
        labels_c, preds_c = labels, preds_b
    # The three Gram matrices are shared by GED, the Dice matrix and the CI score.
    i_lp = pairwise_intersections(labels_c, preds_c)
    i_ll = pairwise_intersections(labels_c, labels_c)
    i_pp = pairwise_intersections(preds_c, preds_c)
    ged = ged_from_flat(labels_c, preds_c, convention, estimator, intersections=(i_lp, i_ll, i_pp))
    sizes = (torch.diagonal(i_ll, dim1=-2, dim2=-1), torch.diagonal(i_pp, dim1=-2, dim2=-1))
    d = pairwise_dice(labels_c, preds_c, convention, inter=i_lp, sizes=sizes)
    d_std = d if convention == "standard" else pairwise_dice(labels_c, preds_c, "standard", inter=i_lp, sizes=sizes)
    dmax = dice_max_from_matrix(d)
    aligned = dice_per_rater_aligned(d)
    soft = dice_soft_from_flat(labels, preds_s, thresholds, convention)
    ci = ci_from_flat(labels_c, preds_c, d_std, inter_labels=i_ll, inter_preds=i_pp, num_pixels=num_pixels)
    ncc = s_ncc_from_flat(labels, preds_s)
    ratio = diversity_ratio(ged.preds, ged.labels)
    var = variances_from_flat(labels, preds_s)
    cal = calibration_from_flat(labels, preds_s)

    n, m = int(labels.shape[-2]), int(preds_b.shape[-2])
    # One transfer to the host for everything (a per-value float() would synchronise a GPU each time).
    names = ("ged", "ged_cross", "ged_labels", "ged_preds", "dice_soft", "dice_max", "dice_max_reverse")
    stacked = torch.stack(
        [ged.ged, ged.cross, ged.labels, ged.preds, soft, dmax.dice_max, dmax.dice_max_reverse, ci.ci, ncc,
         ratio, var.sample_variance, var.rater_variance, cal.brier, cal.brier_fg, cal.ece,
         (sizes[0] == 0).double().mean(-1), (sizes[1] == 0).double().mean(-1)], -1
    )
    rows = stacked.to("cpu", torch.float64).tolist()
    d_host = d.to("cpu", torch.float64)
    aligned_host = aligned.to("cpu", torch.float64).tolist() if aligned is not None else None
    records: list[dict[str, Any]] = []
    for b, row in enumerate(rows):  # per-case assembly and Hungarian matching (SciPy, on the host)
        match = dice_match_from_matrix(d_host[b])
        rec: dict[str, Any] = dict(zip(names, row[: len(names)], strict=True))
        rec["dice_match"] = match.dice_match
        rec["dice_per_rater_matched"] = [float(v) for v in match.per_rater]
        if aligned_host is not None:
            rec["dice_per_rater"] = aligned_host[b]
        rec["ci_score"] = row[len(names)]
        rec["s_ncc"] = row[len(names) + 1]
        rec.update(zip(EXTRA_KEYS, row[len(names) + 2 :], strict=True))
        rec["convention"] = convention
        rec["estimator"] = estimator
        rec["num_labels"] = n
        rec["num_predictions"] = m
        records.append(rec)
    return records


def case_metrics(
    labels: object,
    preds: object,
    convention: Convention = "standard",
    estimator: Estimator = "v",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[str, Any]:
    """Every metric of one case.

    Args:
        labels: ``(N, *S)`` binary masks (bool or 0/1), ``*S`` = ``(H, W)`` or ``(D, H, W)``; NumPy or torch.
        preds: ``(M, *S)`` foreground probabilities in ``[0, 1]`` (or binary masks). Binarised with ``> 0.5``
            for GED, the Dice matrix and CI; used soft for Dice_soft and S_NCC.
        convention: ``"standard"`` (IoU(∅,∅) = Dice(∅,∅) = 1) or ``"reference"`` (D-Persona/ProSeg code).
        estimator: GED within-set estimator, ``"v"`` (pairs include ``i = i′``) or ``"u"`` (``i ≠ i′``).
        thresholds: Dice_soft thresholds (strict ``>``).

    Returns:
        A dict with the keys of ``proseg score --json`` (see the module docstring).

    Raises:
        ValueError: shape mismatch, non-binary labels, predictions outside ``[0, 1]``, unknown options.

    Example:
        >>> import torch
        >>> labels = torch.zeros(2, 8, 8); labels[0, 2:6, 2:6] = 1; labels[1, 2:6, 2:7] = 1
        >>> rec = case_metrics(labels, labels)
        >>> rec["ged"], rec["dice_match"], rec["dice_per_rater"]
        (0.0, 1.0, [1.0, 1.0])
    """
    return _records(labels, preds, convention, estimator, thresholds, batched=False)[0]


def batch_case_metrics(
    labels: object,
    preds: object,
    convention: Convention = "standard",
    estimator: Estimator = "v",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> list[dict[str, Any]]:
    """:func:`case_metrics` for ``B`` cases of the same shape at once (batched matrix products).

    Args:
        labels: ``(B, N, *S)`` binary masks.
        preds: ``(B, M, *S)`` probabilities or binary masks.

    Returns:
        ``B`` records, identical to calling :func:`case_metrics` per case.
    """
    return _records(labels, preds, convention, estimator, thresholds, batched=True)


def _records(labels: object, preds: object, convention: Convention, estimator: Estimator,
             thresholds: Sequence[float], *, batched: bool) -> list[dict[str, Any]]:
    """Check the options, validate and flatten the inputs, and score them (one record per case)."""
    check_convention(convention)
    check_estimator(estimator)
    ts = check_thresholds(thresholds)
    return _records_from_flat(flatten_cases(labels, preds, batched=batched), convention, estimator, ts)
