"""Our Dice against MONAI's ``DiceMetric`` (the field's common implementation), non-empty and empty masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from proseg.metrics import dice_matrix
from proseg.metrics.inputs import flatten_cases

monai_metrics = pytest.importorskip("monai.metrics")


@pytest.mark.parametrize("spatial", [(9, 11), (3, 7, 6)])
def test_dice_matrix_matches_monai_dicemetric(spatial: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    n, k = 3, 4
    labels = rng.random((n, *spatial)) > 0.5
    preds = rng.random((k, *spatial)).astype(np.float32)
    labels[1] = False  # one empty rater
    preds[2] = 0.1  # one empty prediction
    flat = flatten_cases(labels, preds)
    ours = dice_matrix(flat.labels, flat.preds_binary)  # (N, M)

    # MONAI on every (label, prediction) pair as a batch of one-channel images; ignore_empty=False gives
    # MONAI's rule for an empty label: 1 when the prediction is empty too, else 0 (our "standard").
    y = torch.from_numpy(labels).float()[:, None].repeat_interleave(k, dim=0)  # pairs (i, j), i major
    y_pred = torch.from_numpy(preds > 0.5).float()[:, None].repeat(n, *([1] * (len(spatial) + 1)))
    metric = monai_metrics.DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    metric(y_pred=y_pred, y=y)
    theirs = metric.aggregate().reshape(n, k).double()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert float(ours[1, 2]) == 1.0  # Dice(∅, ∅) = 1 in both
