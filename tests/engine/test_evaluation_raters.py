"""Per-rater scores stay in rater slots when a rater is absent from some cases."""

from __future__ import annotations

import math

import numpy as np

from proseg.engine.evaluation import evaluate_cases
from proseg.engine.types import CaseData
from proseg.metrics import aggregate
from tests.engine.engine_helpers import TinyConvModel


def test_an_absent_rater_leaves_a_gap_not_a_shift() -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 1, 1, 16, 16)).astype(np.float32)  # two cases of one slice
    masks = np.zeros((2, 1, 3, 16, 16), bool)
    masks[:, :, :, 4:12, 4:12] = True
    present = {"a": np.array([True, True, True]), "b": np.array([True, False, True])}  # rater 1 absent from b
    cases = {cid: CaseData(cid, images[i], masks[i], present[cid]) for i, cid in enumerate(("a", "b"))}
    model = TinyConvModel(1, 3)
    records, _, _ = evaluate_cases(model, ["a", "b"], cases.__getitem__, modes=["personalized"], num_samples=2,
                                   conventions=("standard",), estimator="v", seed=0)
    rec_b = next(r for r in records if r["case_id"] == "b")
    assert len(rec_b["dice_per_rater"]) == 3 and math.isnan(rec_b["dice_per_rater"][1])
    per_rater = aggregate(records)["per_rater"]["dice_per_rater"]
    assert per_rater["n"] == [2, 1, 2]  # rater 2 of case b is averaged with rater 2 of case a, not with rater 1
    rec_a = next(r for r in records if r["case_id"] == "a")
    assert math.isclose(per_rater["mean"][1], rec_a["dice_per_rater"][1])
