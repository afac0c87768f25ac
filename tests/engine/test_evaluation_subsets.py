"""Subset tags, ambiguity_share in personalized records, results_by_subset and the console summary lines."""

from __future__ import annotations

import math

import numpy as np

from proseg.commands.evaluate import subset_summaries, summary_table
from proseg.engine.evaluation import evaluate_cases
from proseg.engine.types import CaseData
from proseg.metrics import ambiguity_share
from tests.engine.engine_helpers import TinyConvModel


def test_records_carry_subset_and_ambiguity_share() -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 1, 1, 16, 16)).astype(np.float32)
    masks = np.zeros((2, 1, 3, 16, 16), bool)
    masks[:, :, :, 4:12, 4:12] = True
    masks[1, :, 2] = False  # rater 2 left case b empty
    present = np.array([True, True, True])
    cases = {cid: CaseData(cid, images[i], masks[i], present) for i, cid in enumerate(("a", "b"))}
    records, kept, _ = evaluate_cases(TinyConvModel(1, 3), ["a", "b"], cases.__getitem__,
                                      modes=["personalized", "diverse"], num_samples=3,
                                      conventions=("standard", "reference"), seed=0, keep={"a"})
    assert {r["case_id"]: r["subset"] for r in records} == {"a": "every_rater_drew", "b": "some_rater_empty"}
    pers = [r for r in records if r["mode"] == "personalized"]
    assert all(0.0 <= r["ambiguity_share"] <= 1.0 for r in pers)
    assert all("ambiguity_share" not in r for r in records if r["mode"] == "diverse")
    rec_a = next(r for r in pers if r["case_id"] == "a" and r["convention"] == "standard")
    assert math.isclose(rec_a["ambiguity_share"], ambiguity_share(kept["a"]["personalized"]))
    assert all(k in rec_a for k in ("diversity_ratio", "brier", "brier_fg", "ece", "sample_variance"))
    by = subset_summaries([r for r in pers if r["convention"] == "standard"], (0.1, 0.3, 0.5, 0.7, 0.9))
    assert by["all"]["num_cases"] == 2 and by["every_rater_drew"]["num_cases"] == 1
    assert by["some_rater_empty"]["metrics"]["ged"]["mean"] == next(
        r["ged"] for r in pers if r["case_id"] == "b" and r["convention"] == "standard")
    only_a = [r for r in pers if r["case_id"] == "a" and r["convention"] == "standard"]
    assert subset_summaries(only_a, (0.5,))["some_rater_empty"] is None


def _summ(ged: float, n: int = 2) -> dict:
    return {"num_cases": n, "metrics": {"ged": {"mean": ged, "std": 0.0, "n": n},
                                        "diversity_ratio": {"mean": 0.5, "std": 0.1, "n": 1},
                                        "brier": {"mean": 0.01, "std": 0.0, "n": n}}, "per_rater": {}}


def test_summary_table_prints_detail_and_subset_lines() -> None:
    report = {"results": {"diverse": {"standard": _summ(0.3)}},
              "results_by_subset": {"diverse": {"standard": {"all": _summ(0.3), "every_rater_drew": _summ(0.2, 1),
                                                             "some_rater_empty": None}}}}
    lines = summary_table(report).splitlines()
    assert "ged=0.3000" in lines[0] and "diversity_ratio=0.5000±0.1000 (n=1)" in lines[0]
    assert "diversity/calibration" in lines[1] and "brier=0.0100" in lines[1]
    assert "every_rater_drew: ged=0.2000±0.0000 (n=1)" in lines[2] and "some_rater_empty: no cases" in lines[2]
    assert len(lines) == 3
