"""Hand-computed golden cases (MONAI test_compute_meandice.py style): tiny arrays, the expected value worked
out in the comment next to it. IoU/Dice are of the foreground; predictions are binarised with ``> 0.5``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from proseg.metrics import batch_case_metrics, case_metrics, ci_score, generalized_energy_distance, s_ncc
from proseg.metrics.case import RECORD_KEYS


def m(*rows: list[int]) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


# ---- Case A: N = 2 labels, M = 2 binary predictions on a 2x2 image ---------------------------------------
# A1 = [[1,1],[0,0]]  A2 = [[1,0],[0,0]]     P1 = [[1,1],[0,0]]  P2 = [[0,0],[1,1]]
A_LABELS = np.stack([m([1, 1], [0, 0]), m([1, 0], [0, 0])])
A_PREDS = np.stack([m([1, 1], [0, 0]), m([0, 0], [1, 1])])
# d = 1 - IoU:  d(A1,P1)=0  d(A1,P2)=1  d(A2,P1)=1-1/2=.5  d(A2,P2)=1   -> cross = 2.5/4 = .625
# d(A1,A2) = .5 -> V: (0+.5+.5+0)/4 = .25, U: .5;   d(P1,P2) = 1 -> V: .5, U: 1
# GED_V = 2*.625 - .25 - .5 = .5;  GED_U = 1.25 - .5 - 1 = -.25
# Dice: D = [[1, 0], [2/3, 0]] -> Dice_max (best label per prediction) = (1 + 0)/2 = .5
# Dice_max_reverse (best prediction per label) = (1 + 2/3)/2 = 5/6; Hungarian: A1-P1 + A2-P2 = 1 > 2/3 -> .5
# Dice_soft: label mean [[1,.5],[0,0]], pred mean .5 everywhere:
#   t=.1,.3: L={2 px}, P={4 px}, |L∩P|=2 -> 4/6 = 2/3;  t=.5,.7,.9: L={1 px}, P=∅ -> 0   => (4/3)/5 = 4/15
# CI: S_c = 2/(2+0) = 1; D_max = 5/6; Var(A1-A2) = Var([0,1,0,0]) = .25-.0625 = .1875 (one pair);
#   Var(P1-P2) = Var([1,1,-1,-1]) = 1 -> D_a = 1 - (.8125 + .8125)/2 = .1875
#   CI = 3*1*(5/6)*.1875 / (1 + 5/6 + .1875) = .46875 / (97/48) = 22.5/97
A_EXPECTED = {
    "ged": 0.5,
    "ged_cross": 0.625,
    "ged_labels": 0.25,
    "ged_preds": 0.5,
    "dice_soft": 4 / 15,
    "dice_max": 0.5,
    "dice_max_reverse": 5 / 6,
    "dice_match": 0.5,
    "dice_per_rater_matched": [1.0, 0.0],
    "dice_per_rater": [1.0, 0.0],
    "ci_score": 22.5 / 97,
}

# ---- Case B: all labels empty; P1 = [[1,0],[0,0]] (prob .9), P2 = ∅ (prob .2) ------------------------------
B_LABELS = np.zeros((2, 2, 2), dtype=np.float32)
B_PREDS = np.stack([m([0.9, 0], [0, 0]), m([0.2, 0], [0, 0])])
# standard: d(∅,P1)=1, d(∅,∅)=0 -> cross = 2/4 = .5; d_aa = 0; d(P1,P2)=1 -> V .5  => GED_V = 1 - 0 - .5 = .5
# Dice: D = [[0,1],[0,1]] -> Dice_max = (0+1)/2 = .5, reverse = 1, match = (0+1)/2 = .5
# Dice_soft: label mean 0; pred mean [[.55,0],[0,0]] -> t=.1,.3,.5: Dice(∅, 1px) = 0; t=.7,.9: Dice(∅,∅) = 1
#   => 2/5
# CI: union of labels empty -> S_c = 1; D_max = 1; V_labels = {0}; Var(P1-P2) = Var([1,0,0,0]) = .1875
#   -> D_a = 1 - .1875 = .8125; CI = 3*.8125/2.8125 = 13/15
B_EXPECTED = {
    "ged": 0.5,
    "ged_cross": 0.5,
    "ged_labels": 0.0,
    "ged_preds": 0.5,
    "dice_soft": 0.4,
    "dice_max": 0.5,
    "dice_max_reverse": 1.0,
    "dice_match": 0.5,
    "ci_score": 13 / 15,
}

# ---- Case C: all predictions empty (M = 3, every probability .2) ------------------------------------------
C_LABELS = A_LABELS
C_PREDS = np.full((3, 2, 2), 0.2, dtype=np.float32)
# d(A,∅) = 1 -> cross = 1; d_aa V = .25 (case A); d_pp = 0 => GED_V = 2 - .25 = 1.75
# Dice matrix all 0 -> Dice_max = reverse = match = 0, per rater matched [0, 0]
# Dice_soft: label mean [[1,.5],[0,0]], pred mean .2: t=.1 -> L 2px, P 4px -> 2/3; t>=.3 -> P=∅, L≠∅ -> 0
#   => (2/3)/5 = 2/15
# CI: S_c = 0/(0+2) = 0 -> CI = 0.  S_NCC: every sample identical -> E_ss constant -> NaN.
C_EXPECTED = {
    "ged": 1.75,
    "ged_cross": 1.0,
    "ged_labels": 0.25,
    "ged_preds": 0.0,
    "dice_soft": 2 / 15,
    "dice_max": 0.0,
    "dice_max_reverse": 0.0,
    "dice_match": 0.0,
    "dice_per_rater_matched": [0.0, 0.0],
    "ci_score": 0.0,
}

# ---- Case D: one empty rater, N = 3 > M = 2 -----------------------------------------------------------------
# A1 = A3 = [[1,1],[0,0]], A2 = ∅;  P1 = [[1,1],[0,0]], P2 = ∅
D_LABELS = np.stack([m([1, 1], [0, 0]), m([0, 0], [0, 0]), m([1, 1], [0, 0])])
D_PREDS = np.stack([m([1, 1], [0, 0]), m([0, 0], [0, 0])])
# standard: cross d = [[0,1],[1,0],[0,1]] -> 3/6 = .5; d_aa off-diagonal: d(A1,A2)=1 d(A1,A3)=0 d(A2,A3)=1
#   -> V 4/9, U 4/6; d_pp: d(P1,P2)=1 -> V .5, U 1  => GED_V = 1 - 4/9 - .5 = 1/18; GED_U = 1 - 2/3 - 1 = -2/3
# Dice D = [[1,0],[0,1],[1,0]] -> Dice_max = 1, reverse = 1; Hungarian (2 pairs): 1 -> Dice_match = 1
#   per-rater matched: A2 -> P2 (1), one of A1/A3 -> P1 (1), the other unmatched (NaN)
# CI: S_c = 1, D_max = 1; label pair variances: Var(A1-A2)=Var([1,1,0,0])=.25, Var(A1-A3)=0, Var(A2-A3)=.25
#   pred: Var(P1-P2)=.25 -> ΔV_max = 0, ΔV_min = .25 -> D_a = .875; CI = 3*.875/2.875 = 21/23
D_EXPECTED = {
    "ged": 1 / 18,
    "ged_cross": 0.5,
    "ged_labels": 4 / 9,
    "ged_preds": 0.5,
    "dice_max": 1.0,
    "dice_max_reverse": 1.0,
    "dice_match": 1.0,
    "ci_score": 21 / 23,
}

# ---- Case E: a 3D volume (2x2x2), N = 2, M = 1: scored as one volume, not per slice -----------------------
E_LABELS = np.zeros((2, 2, 2, 2), dtype=np.float32)
E_LABELS[0, 0, 0, 0] = E_LABELS[0, 1, 0, 0] = 1  # A1: two voxels on two slices
E_LABELS[1, 0, 0, 0] = 1  # A2: one voxel
E_PREDS = np.zeros((1, 2, 2, 2), dtype=np.float32)
E_PREDS[0, 1, 0, 0] = 0.9  # P1: the second voxel of A1
# IoU(A1,P1) = 1/2, IoU(A2,P1) = 0 -> cross = (.5 + 1)/2 = .75; d(A1,A2) = .5 -> V .25; d_pp V = 0
#   => GED_V = 1.5 - .25 = 1.25. Dice(A1,P1) = 2/3, Dice(A2,P1) = 0 -> Dice_max = 2/3, reverse = 1/3,
#   Dice_match (1 pair) = 2/3, per-rater matched [2/3, NaN]
E_EXPECTED = {
    "ged": 1.25,
    "ged_cross": 0.75,
    "ged_labels": 0.25,
    "ged_preds": 0.0,
    "dice_max": 2 / 3,
    "dice_max_reverse": 1 / 3,
    "dice_match": 2 / 3,
}

# ---- Case F: N = M = 7 one-pixel masks on a 1x7 image, predictions in reversed order ----------------------
F_LABELS = np.eye(7, dtype=np.float32)[:, None, :]  # A_i = pixel i
F_PREDS = np.eye(7, dtype=np.float32)[::-1, None, :].copy()  # P_j = pixel 6 - j
# IoU(A_i, P_j) = 1 iff i = 6 - j: cross = 1 - 7/49 = 6/7; d_aa = d_pp: off-diagonal 1 -> V 42/49 = 6/7
#   => GED_V = 12/7 - 12/7 = 0;  U: within terms 1 -> GED_U = 12/7 - 2 = -2/7
# Dice_max = reverse = match = 1 (Hungarian finds the anti-diagonal); aligned D[i,i] = 1 only for i = 3
# Dice_soft: label and pred means 1/7 per pixel: t=.1 both all 7 px -> 1; t>=.3 both ∅ -> 1  => 1
# CI: S_c = 1, D_max = 1, every pair variance Var(e_i - e_j) = 2/7 on both sides -> D_a = 1 -> CI = 1
F_EXPECTED = {
    "ged": 0.0,
    "ged_cross": 6 / 7,
    "ged_labels": 6 / 7,
    "ged_preds": 6 / 7,
    "dice_soft": 1.0,
    "dice_max": 1.0,
    "dice_max_reverse": 1.0,
    "dice_match": 1.0,
    "dice_per_rater_matched": [1.0] * 7,
    "dice_per_rater": [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
    "ci_score": 1.0,
}

GOLDEN = [
    pytest.param(A_LABELS, A_PREDS, A_EXPECTED, id="A_n2_m2"),
    pytest.param(B_LABELS, B_PREDS, B_EXPECTED, id="B_all_labels_empty"),
    pytest.param(C_LABELS, C_PREDS, C_EXPECTED, id="C_all_preds_empty"),
    pytest.param(D_LABELS, D_PREDS, D_EXPECTED, id="D_one_empty_rater_n3_m2"),
    pytest.param(E_LABELS, E_PREDS, E_EXPECTED, id="E_3d_volume"),
    pytest.param(F_LABELS, F_PREDS, F_EXPECTED, id="F_n7_reversed"),
]


@pytest.mark.parametrize(("labels", "preds", "expected"), GOLDEN)
def test_golden_standard_v(labels: np.ndarray, preds: np.ndarray, expected: dict) -> None:
    rec = case_metrics(labels, preds)
    for key, val in expected.items():
        if isinstance(val, list):
            assert rec[key] == pytest.approx(val, abs=1e-12), key
        else:
            assert rec[key] == pytest.approx(val, abs=1e-12), key


# GED under the U-statistic (i ≠ i′), from the comments above; NaN when a set has a single mask.
@pytest.mark.parametrize(
    ("labels", "preds", "expected"),
    [
        pytest.param(A_LABELS, A_PREDS, -0.25, id="A"),
        pytest.param(C_LABELS, C_PREDS, 2.0 - 0.5 - 0.0, id="C"),  # d_aa U = .5, d_pp U = 0
        pytest.param(D_LABELS, D_PREDS, -2 / 3, id="D"),
        pytest.param(F_LABELS, F_PREDS, -2 / 7, id="F_n7"),
        pytest.param(E_LABELS, E_PREDS, math.nan, id="E_single_prediction"),
    ],
)
def test_golden_u_statistic(labels: np.ndarray, preds: np.ndarray, expected: float) -> None:
    rec = case_metrics(labels, preds, estimator="u")
    if math.isnan(expected):
        assert math.isnan(rec["ged"]) and math.isnan(rec["ged_preds"])
    else:
        assert rec["ged"] == pytest.approx(expected, abs=1e-12)


# The reference convention (D-Persona/ProSeg code): IoU(∅,∅) = 0, so two empty masks — also an empty mask and
# itself on the V-statistic diagonal — are at distance 1; values up to the 1e-8 smoothing.
@pytest.mark.parametrize(
    ("labels", "preds", "expected"),
    [
        # B: cross all 1 (∅ vs P1: 0/1, ∅ vs ∅: 0/1e-8); d_aa all 1; d_pp: only d(P1,P1) = 0 -> 3/4
        #    => GED = 2 - 1 - .75 = .25
        pytest.param(B_LABELS, B_PREDS, {"ged": 0.25, "ged_cross": 1.0, "ged_labels": 1.0, "ged_preds": 0.75}, id="B"),
        # D: cross d = [[0,1],[1,1],[0,1]] -> 4/6; d_aa = 4 off-diagonal + d(A2,A2) = 1 -> 5/9;
        #    d_pp = (0 + 1 + 1 + 1)/4 = 3/4  => GED = 4/3 - 5/9 - 3/4 = 1/36
        pytest.param(
            D_LABELS, D_PREDS, {"ged": 1 / 36, "ged_cross": 4 / 6, "ged_labels": 5 / 9, "ged_preds": 0.75}, id="D"
        ),
        # everything empty: every distance 1 -> GED = 2 - 1 - 1 = 0, all Dice 1 (smoothing)
        pytest.param(
            np.zeros((2, 3, 3)), np.zeros((2, 3, 3)), {"ged": 0.0, "ged_cross": 1.0, "dice_match": 1.0}, id="empty"
        ),
    ],
)
def test_golden_reference_convention(labels: np.ndarray, preds: np.ndarray, expected: dict) -> None:
    rec = case_metrics(labels, preds, convention="reference")
    for key, val in expected.items():
        assert rec[key] == pytest.approx(val, abs=1e-7), key


def test_keys_and_optional_aligned_dice() -> None:
    rec = case_metrics(A_LABELS, A_PREDS)
    assert tuple(rec) == RECORD_KEYS
    assert rec["convention"] == "standard" and rec["estimator"] == "v"
    assert (rec["num_labels"], rec["num_predictions"]) == (2, 2)
    rec_nm = case_metrics(D_LABELS, D_PREDS)  # M != N: no aligned per-rater Dice
    assert "dice_per_rater" not in rec_nm
    assert tuple(rec_nm) == tuple(k for k in RECORD_KEYS if k != "dice_per_rater")


def test_unmatched_rater_is_nan() -> None:
    per = case_metrics(D_LABELS, D_PREDS)["dice_per_rater_matched"]
    assert per[1] == 1.0  # the empty rater matched to the empty prediction (Dice(∅,∅) = 1)
    assert sorted(math.isnan(v) for v in (per[0], per[2])) == [False, True]
    e = case_metrics(E_LABELS, E_PREDS)["dice_per_rater_matched"]
    assert e[0] == pytest.approx(2 / 3) and math.isnan(e[1])


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        # Two identical samples p = [.5, .5, .1, .1] (so E_ss = binary entropy H(p) = [.693, .693, .325, .325]).
        # y = [1, 1, 0, 0]: E_sy = CE(p, y) = [-log .5, -log .5, -log .9, -log .9] = [.693, .693, .105, .105]:
        #   only two distinct (E_ss, E_sy) points, both coordinates larger on the first -> NCC = +1
        pytest.param(np.stack([m([1, 1, 0, 0]), m([1, 1, 0, 0])]), 1.0, id="plus_one"),
        # y = [0, 0, 1, 1]: E_sy = [.693, .693, 2.303, 2.303]: E_sy falls where E_ss rises -> NCC = -1
        pytest.param(np.stack([m([0, 0, 1, 1]), m([0, 0, 1, 1])]), -1.0, id="minus_one"),
        # one rater each way: mean of +1 and -1 = 0
        pytest.param(np.stack([m([1, 1, 0, 0]), m([0, 0, 1, 1])]), 0.0, id="zero"),
    ],
)
def test_s_ncc_golden(labels: np.ndarray, expected: float) -> None:
    preds = np.stack([m([0.5, 0.5, 0.1, 0.1]), m([0.5, 0.5, 0.1, 0.1])])
    assert float(s_ncc(labels, preds)) == pytest.approx(expected, abs=1e-9)
    assert case_metrics(labels, preds)["s_ncc"] == pytest.approx(expected, abs=1e-9)


def test_s_ncc_nan_for_constant_map() -> None:
    # Case C: every sample identical and constant -> E_ss constant -> undefined correlation
    assert math.isnan(case_metrics(C_LABELS, C_PREDS)["s_ncc"])


def test_dice_soft_thresholds_argument() -> None:
    # Case A with a single threshold .1: Dice = 2/3 (see above); with (.5,): 0
    assert case_metrics(A_LABELS, A_PREDS, thresholds=(0.1,))["dice_soft"] == pytest.approx(2 / 3)
    assert case_metrics(A_LABELS, A_PREDS, thresholds=(0.5,))["dice_soft"] == 0.0


def test_functional_entry_points_match_case_metrics() -> None:
    g = generalized_energy_distance(A_LABELS, A_PREDS)
    assert float(g.ged) == pytest.approx(0.5) and float(g.cross) == pytest.approx(0.625)
    ci = ci_score(D_LABELS, D_PREDS)
    assert float(ci.diversity_agreement) == pytest.approx(0.875)
    assert float(ci.ci) == pytest.approx(21 / 23)


def test_batch_equals_per_case_and_torch_equals_numpy() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((3, 4, 9, 9)) > 0.6).astype(np.float32)
    preds = rng.random((3, 5, 9, 9)).astype(np.float32)
    batch = batch_case_metrics(labels, preds, convention="reference")
    for b in range(3):
        single = case_metrics(torch.from_numpy(labels[b]), torch.from_numpy(preds[b]), convention="reference")
        assert batch[b].keys() == single.keys()
        for key, val in single.items():
            if isinstance(val, (list, float)):
                assert batch[b][key] == pytest.approx(val, abs=1e-12, nan_ok=True), key
            else:
                assert batch[b][key] == val, key


def test_bool_and_integer_inputs() -> None:
    rec_bool = case_metrics(A_LABELS.astype(bool), A_PREDS.astype(bool))
    rec_int = case_metrics(A_LABELS.astype(np.uint8), A_PREDS.astype(np.int64))
    assert rec_bool["ged"] == rec_int["ged"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("labels", "preds", "match"),
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), "do not match"),
        (np.zeros((4, 4)), np.zeros((4, 4)), "must have shape"),
        (np.full((2, 4, 4), 0.5), np.zeros((2, 4, 4)), "binary"),
        (np.zeros((2, 4, 4)), np.full((2, 4, 4), 3.0), r"\[0, 1\]"),
        (np.zeros((0, 4, 4)), np.zeros((2, 4, 4)), "at least one"),
    ],
)
def test_bad_input_raises(labels: np.ndarray, preds: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        case_metrics(labels, preds)


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"convention": "x"}, "convention"), ({"estimator": "w"}, "estimator"), ({"thresholds": (1.5,)}, "thresholds")],
)
def test_bad_options_raise(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        case_metrics(A_LABELS, A_PREDS, **kw)


def test_dice_functional_entry_points() -> None:
    from proseg.metrics import dice_match, dice_max, dice_soft

    # Case A (see above): Dice_max .5, reverse 5/6, their mean 2/3; Dice_match .5 with A1-P1, A2-P2
    dm = dice_max(A_LABELS, A_PREDS)
    assert (float(dm.dice_max), float(dm.dice_max_reverse), float(dm.mean)) == pytest.approx((0.5, 5 / 6, 2 / 3))
    match = dice_match(A_LABELS, A_PREDS)
    assert match.dice_match == pytest.approx(0.5) and match.assignment.tolist() == [0, 1]
    assert float(dice_soft(A_LABELS, A_PREDS)) == pytest.approx(4 / 15)
