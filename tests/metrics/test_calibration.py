"""Diversity ratio, pixel variances, ambiguity share, Brier / foreground Brier / ECE: hand-computed golden cases
(tiny 2x2 images, the expected value worked out beside them), empty masks, and the record / aggregate / CSV plumbing.

Notation: f = mean of the raters' masks (frequency map), p̄ = mean of the soft predictions (soft mean)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from proseg.metrics import (
    aggregate,
    ambiguity_share,
    calibration,
    case_metrics,
    diversity_ratio,
    pixel_variances,
    write_records_csv,
)
from proseg.metrics.case import EXTRA_KEYS, METRIC_KEYS, RECORD_KEYS, SAMPLE_KEYS
from proseg.metrics.uncertainty import uncertainty_maps


def m(*rows: list[float]) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


# ---- Case G1: N = 2 raters, M = 2 soft predictions on 2x2 ----------------------------------------------------
# A1 = [[1,1],[0,0]]  A2 = [[1,0],[0,0]]           -> f  = [[1, .5], [0, 0]]
# p1 = [[1,.5],[0,0]] p2 = [[.5,.5],[0,.25]]       -> p̄  = [[.75, .5], [0, .125]]
# p̄ − f = [[-.25, 0], [0, .125]]
# brier    = (.0625 + 0 + 0 + .015625)/4 = .01953125
# brier_fg: F = union {(0,0),(0,1)} ∪ {p̄ > .05} {(0,0),(0,1),(1,1)} = 3 px -> .078125/3
# ece: .75 -> bin 7, .5 -> bin 5, 0 -> bin 0, .125 -> bin 1: one pixel each -> (.25 + 0 + 0 + .125)/4 = .09375
# sample_variance: Var(1,.5) = .0625, Var(.5,.5) = 0, Var(0,0) = 0, Var(0,.25) = .015625 -> .078125/4 = .01953125
# rater_variance: f(1-f) = 0, .25, 0, 0 -> .0625
# diversity_ratio: masks > .5: P1 = [[1,0],[0,0]], P2 = ∅.
#   standard V: d(P1,P2) = 1 -> d_pp = 2/4 = .5; d(A1,A2) = 1 - 1/2 = .5 -> d_aa = 1/4 -> ratio 2
#   standard U: d_pp = 1, d_aa = .5 -> 2;  reference V: d(P2,P2) = 1 (empty self-pair) -> d_pp = 3/4, d_aa = 1/4 -> 3
G1_LABELS = np.stack([m([1, 1], [0, 0]), m([1, 0], [0, 0])])
G1_PREDS = np.stack([m([1, 0.5], [0, 0]), m([0.5, 0.5], [0, 0.25])])
G1_EXPECTED = {
    "brier": 0.01953125,
    "brier_fg": 0.078125 / 3,
    "ece": 0.09375,
    "sample_variance": 0.01953125,
    "rater_variance": 0.0625,
    "diversity_ratio": 2.0,
}


def test_golden_g1_standard() -> None:
    rec = case_metrics(G1_LABELS, G1_PREDS)
    for key, val in G1_EXPECTED.items():
        assert rec[key] == pytest.approx(val, abs=1e-12), key
    assert rec["diversity_ratio"] == pytest.approx(rec["ged_preds"] / rec["ged_labels"], abs=1e-12)
    cal = calibration(G1_LABELS, G1_PREDS)
    assert [float(v) for v in cal] == pytest.approx([0.01953125, 0.078125 / 3, 0.09375], abs=1e-12)
    var = pixel_variances(G1_LABELS, G1_PREDS)
    assert (float(var.sample_variance), float(var.rater_variance)) == pytest.approx((0.01953125, 0.0625), abs=1e-12)


def test_golden_g1_estimator_and_convention_only_change_the_ratio() -> None:
    std = case_metrics(G1_LABELS, G1_PREDS)
    u = case_metrics(G1_LABELS, G1_PREDS, estimator="u")
    ref = case_metrics(G1_LABELS, G1_PREDS, convention="reference")
    assert u["diversity_ratio"] == pytest.approx(2.0, abs=1e-12)
    assert ref["diversity_ratio"] == pytest.approx(3.0, abs=1e-7)
    for key in ("brier", "brier_fg", "ece", "sample_variance", "rater_variance"):
        assert std[key] == u[key] == ref[key], key


# ---- Case G2: one rater, bins that pool pixels ------------------------------------------------------------------
# A = [[1,0],[0,0]], p̄ = [[.5,.5],[0,0]]: bin 5 holds (0,0) with p̄ − f = -.5 and (0,1) with +.5 -> they cancel,
#   bin 0 holds the two background pixels (0): ece = 0 (calibrated per bin, though not sharp):
#   brier = (.25 + .25)/4 = .125; F = {(0,0),(0,1)} -> brier_fg = .5/2 = .25
def test_golden_g2_errors_cancel_within_a_bin() -> None:
    cal = calibration(m([1, 0], [0, 0])[None], m([0.5, 0.5], [0, 0])[None])
    assert [float(v) for v in cal] == pytest.approx([0.125, 0.25, 0.0], abs=1e-12)


# ---- Case G3: bin edges --------------------------------------------------------------------------------------
# A = [[0,1],[0,0]], p̄ = [[1, .9375],[0, .1]]: p̄ = 1 joins the last bin [.9, 1] with .9375:
#   bin 9: (1 − 0) + (.9375 − 1) = .9375; p̄ = .1 opens bin 1: |.1 − 0| (float32 .1); bin 0: 0
#   ece = (.9375 + .1)/4  (a separate bin for p̄ = 1 would give (1 + .0625 + .1)/4)
def test_golden_g3_bin_edges() -> None:
    labels = m([0, 1], [0, 0])[None]
    preds = m([1.0, 0.9375], [0, 0.1])[None]
    p01 = float(np.float32(0.1))
    assert float(calibration(labels, preds).ece) == pytest.approx((0.9375 + p01) / 4, abs=1e-12)
    # the ECE identity sum_b (n_b/P)|mean p̄ − mean f| with explicit bins
    pbar, f = preds[0].astype(np.float64).ravel(), labels[0].astype(np.float64).ravel()
    bins = np.minimum(np.floor(pbar * 10), 9)
    ece = sum((bins == b).mean() * abs(pbar[bins == b].mean() - f[bins == b].mean()) for b in np.unique(bins))
    assert float(calibration(labels, preds).ece) == pytest.approx(ece, abs=1e-12)


# ---- Empty masks --------------------------------------------------------------------------------------------
def test_all_empty_raters_and_zero_soft_mean_are_perfectly_calibrated() -> None:
    labels, preds = np.zeros((3, 2, 2)), np.zeros((4, 2, 2), dtype=np.float32)
    rec = case_metrics(labels, preds)
    assert (rec["brier"], rec["ece"], rec["sample_variance"], rec["rater_variance"]) == (0.0, 0.0, 0.0, 0.0)
    assert math.isnan(rec["brier_fg"])  # empty region
    assert math.isnan(rec["diversity_ratio"])  # standard: d_aa = 0
    # reference: two empty masks are at distance 1, so d_aa = d_pp = 1 -> ratio 1
    assert case_metrics(labels, preds, convention="reference")["diversity_ratio"] == pytest.approx(1.0)


def test_all_empty_raters_with_a_faint_or_a_clear_prediction() -> None:
    labels = np.zeros((2, 2, 2))
    # p̄ = .03125 at one pixel (not > .05): brier = .03125²/4, ece = .03125/4 (bin 0), region empty -> NaN
    faint = calibration(labels, m([0.03125, 0], [0, 0])[None])
    assert float(faint.brier) == pytest.approx(0.03125**2 / 4, abs=1e-15)
    assert float(faint.ece) == pytest.approx(0.03125 / 4, abs=1e-15) and math.isnan(float(faint.brier_fg))
    # p̄ = .25 at one pixel: the region is that pixel -> brier_fg = .0625; brier = .0625/4; ece = .25/4 (bin 2)
    clear = calibration(labels, m([0.25, 0], [0, 0])[None])
    assert [float(v) for v in clear] == pytest.approx([0.0625 / 4, 0.0625, 0.25 / 4], abs=1e-15)


def test_one_empty_rater_counts_in_the_frequency_map() -> None:
    # A1 = [[1,0],[0,0]], A2 = ∅ -> f = [[.5,0],[0,0]]; p̄ = f exactly -> brier = ece = brier_fg = 0
    # rater_variance = .25/4; d(A1,A2) = 1 -> d_aa = .5; P = masks of p > .5 = ∅, ∅ -> d_pp = 0 -> ratio 0
    labels = np.stack([m([1, 0], [0, 0]), m([0, 0], [0, 0])])
    preds = np.stack([m([0.5, 0], [0, 0]), m([0.5, 0], [0, 0])])
    rec = case_metrics(labels, preds)
    assert (rec["brier"], rec["brier_fg"], rec["ece"]) == (0.0, 0.0, 0.0)
    assert rec["rater_variance"] == pytest.approx(0.0625) and rec["diversity_ratio"] == 0.0


def test_three_d_is_one_volume() -> None:
    # (N=1, D=2, 1, 2): f = [[1, 0]], [[0, 0]]; p̄ = .5 everywhere -> brier = 4·.25/4 = .25;
    # one bin (5): |(.5 − 1) + 3·.5| / 4 = .25; F = all 4 voxels -> .25
    labels = np.zeros((1, 2, 1, 2))
    labels[0, 0, 0, 0] = 1
    cal = calibration(labels, np.full((1, 2, 1, 2), 0.5, dtype=np.float32))
    assert [float(v) for v in cal] == pytest.approx([0.25, 0.25, 0.25], abs=1e-12)


# ---- diversity ratio -------------------------------------------------------------------------------------------
def test_diversity_ratio_rule() -> None:
    assert float(diversity_ratio(0.3, 0.6)) == pytest.approx(0.5)
    assert math.isnan(float(diversity_ratio(0.3, 0.0))) and math.isnan(float(diversity_ratio(0.0, 0.0)))
    assert math.isnan(float(diversity_ratio(math.nan, 0.5)))  # U-statistic with one prediction
    out = diversity_ratio(torch.tensor([0.2, 0.1]), torch.tensor([0.4, 0.0]))
    assert out[0] == pytest.approx(0.5) and math.isnan(float(out[1]))


# ---- ambiguity share --------------------------------------------------------------------------------------------
# (R=2, K=2, 1x2): pixel a: rater 0 samples (0, 1), rater 1 (0, 1): rater means .5, .5 -> rater 0, ambiguity .25,
#   total Var(0,1,0,1) = .25;  pixel b: rater 0 (0, 0), rater 1 (1, 1): means 0, 1 -> rater .25, ambiguity 0,
#   total .25  => share = (.25 + 0)/(.25 + .25) = .5
AMB = np.array([[[[0.0, 0.0]], [[1.0, 0.0]]], [[[0.0, 1.0]], [[1.0, 1.0]]]], dtype=np.float32)


def test_golden_ambiguity_share() -> None:
    assert ambiguity_share(AMB) == pytest.approx(0.5, abs=1e-12)
    maps = uncertainty_maps(torch.from_numpy(AMB))
    assert ambiguity_share(AMB) == pytest.approx(float(maps["ambiguity"].sum() / maps["total"].sum()), abs=1e-7)
    assert ambiguity_share(AMB[:, :1]) == 0.0  # K = 1: no within-rater variance
    assert ambiguity_share(AMB[:1]) == pytest.approx(1.0)  # R = 1: all the variance is within the rater
    assert math.isnan(ambiguity_share(np.full((2, 3, 2, 2), 0.3, dtype=np.float32)))  # no variance at all
    with pytest.raises(ValueError, match="R, K"):
        ambiguity_share(np.zeros((2, 2)))


def test_ambiguity_share_matches_the_maps_on_random_samples() -> None:
    x = torch.rand(3, 5, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    maps = uncertainty_maps(x)
    share = ambiguity_share(x)
    assert 0.0 <= share <= 1.0
    assert share == pytest.approx(float(maps["ambiguity"].sum() / maps["total"].sum()), rel=1e-5)


# ---- records, aggregate, CSV ------------------------------------------------------------------------------------
def test_keys_in_records_aggregate_and_csv(tmp_path: Path) -> None:
    assert set(EXTRA_KEYS) <= set(RECORD_KEYS) and not set(SAMPLE_KEYS) & set(RECORD_KEYS)
    assert set(EXTRA_KEYS) | set(SAMPLE_KEYS) <= set(METRIC_KEYS)
    empty = case_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 2), dtype=np.float32))  # ratio NaN
    recs = [{"case_id": "g1", **case_metrics(G1_LABELS, G1_PREDS), "ambiguity_share": 0.5},
            {"case_id": "e", **empty}]
    s = aggregate(recs)["metrics"]
    assert s["diversity_ratio"] == {"mean": 2.0, "std": 0.0, "n": 1}  # the NaN case is left out
    assert s["ambiguity_share"]["n"] == 1 and s["brier_fg"]["n"] == 1
    assert s["brier"]["n"] == 2 and s["brier"]["mean"] == pytest.approx(0.01953125 / 2)
    rows = list(csv.DictReader(write_records_csv(recs, tmp_path / "c.csv").open()))
    assert float(rows[0]["ece"]) == pytest.approx(0.09375) and rows[1]["diversity_ratio"] == "nan"
    assert rows[0]["ambiguity_share"] == "0.5" and rows[1]["ambiguity_share"] == ""


# ---- empty rates: is the sampler calibrated about whether there is a lesion at all? ------------------------------
def test_empty_rates_count_empty_labels_and_binarised_predictions() -> None:
    labels = np.zeros((4, 2, 2))
    labels[0, 0, 0] = labels[1, 0, 0] = labels[1, 1, 1] = 1  # raters 2 and 3 left it empty: 2 / 4
    preds = np.zeros((3, 2, 2), dtype=np.float32)
    preds[0, 0, 0] = 0.9  # drawn
    preds[1, 0, 0] = 0.5  # 0.5 is not above the 0.5 threshold: empty
    for convention in ("standard", "reference"):
        rec = case_metrics(labels, preds, convention=convention)
        assert (rec["empty_labels"], rec["empty_preds"]) == (0.5, pytest.approx(2 / 3, abs=1e-12))
    none = case_metrics(np.ones((2, 2, 2)), np.ones((5, 2, 2), dtype=np.float32))
    assert (none["empty_labels"], none["empty_preds"]) == (0.0, 0.0)
    assert case_metrics(np.zeros((2, 2, 2)), np.zeros((1, 2, 2), dtype=np.float32))["empty_preds"] == 1.0
