"""Dataset-level aggregation: mean ± std with the conventions beside them, NaN handling, CSV writers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from proseg.metrics import case_metrics
from proseg.metrics.aggregate import aggregate, format_summary, write_records_csv, write_summary_csv


def _records(convention: str = "standard", estimator: str = "v") -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i, k in enumerate((4, 4, 7)):
        labels = rng.random((4, 10, 10)) > 0.5
        preds = rng.random((k, 10, 10)).astype(np.float32)
        out.append({"case_id": f"c{i}", **case_metrics(labels, preds, convention=convention, estimator=estimator)})
    return out


def test_mean_std_and_context() -> None:
    recs = _records()
    s = aggregate(recs, thresholds=(0.1, 0.3, 0.5, 0.7, 0.9))
    # hand check against numpy (population std, ddof=0, as the published evaluation prints)
    vals = [r["ged"] for r in recs]
    assert s["metrics"]["ged"]["mean"] == pytest.approx(np.mean(vals), abs=1e-15)
    assert s["metrics"]["ged"]["std"] == pytest.approx(np.std(vals), abs=1e-15)
    assert s["metrics"]["ged"]["n"] == 3
    assert (s["convention"], s["estimator"], s["num_cases"], s["num_labels"]) == ("standard", "v", 3, 4)
    assert s["num_predictions"] == [4, 7] and s["thresholds"] == [0.1, 0.3, 0.5, 0.7, 0.9]
    # aligned per-rater Dice exists only for the two M == N cases
    assert s["per_rater"]["dice_per_rater"]["n"] == [2, 2, 2, 2]
    assert s["per_rater"]["dice_per_rater_matched"]["n"] == [3, 3, 3, 3]
    assert aggregate(recs, ddof=1)["metrics"]["ged"]["std"] == pytest.approx(np.std(vals, ddof=1))
    text = format_summary(s)
    assert all(
        "convention=standard, estimator=v, N=4, K=[4, 7], thresholds=0.1,0.3,0.5,0.7,0.9" in line
        for line in text.splitlines()[1:]
    )


def test_nan_values_are_left_out_and_counted() -> None:
    # U-statistic with a single prediction: ged undefined (NaN) for that case only.
    rng = np.random.default_rng(1)
    labels = rng.random((3, 6, 6)) > 0.5
    recs = [case_metrics(labels, rng.random((k, 6, 6)).astype(np.float32), estimator="u") for k in (1, 3, 4)]
    assert math.isnan(recs[0]["ged"])
    s = aggregate(recs)
    assert s["metrics"]["ged"]["n"] == 2
    assert s["metrics"]["ged"]["mean"] == pytest.approx((recs[1]["ged"] + recs[2]["ged"]) / 2)


def test_mixing_conventions_or_estimators_is_an_error() -> None:
    with pytest.raises(ValueError, match="convention"):
        aggregate(_records("standard") + _records("reference"))
    with pytest.raises(ValueError, match="estimator"):
        aggregate(_records(estimator="v") + _records(estimator="u"))
    with pytest.raises(ValueError, match="no records"):
        aggregate([])


def test_csv_writers(tmp_path: Path) -> None:
    recs = _records("reference")
    p = write_records_csv(recs, tmp_path / "sub" / "cases.csv", thresholds=(0.5,))
    rows = list(csv.DictReader(p.open()))
    assert len(rows) == 3 and rows[2]["num_predictions"] == "7" and rows[2]["dice_per_rater_0"] == ""
    assert rows[0]["convention"] == "reference" and rows[0]["thresholds"] == "0.5"
    assert float(rows[0]["dice_per_rater_matched_3"]) == pytest.approx(recs[0]["dice_per_rater_matched"][3])
    s = aggregate(recs, thresholds=(0.5,))
    q = write_summary_csv(s, tmp_path / "summary.csv")
    srows = list(csv.DictReader(q.open()))
    assert {r["metric"] for r in srows} >= {"ged", "dice_match", "dice_per_rater_matched_0"}
    assert all(r["convention"] == "reference" and r["num_predictions"] == "[4, 7]" for r in srows)
    assert not list(tmp_path.glob("**/*.tmp"))  # atomic writes leave no temp files
