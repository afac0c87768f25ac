"""Property tests (hypothesis, few examples to keep CI fast): GED of a set against itself is 0 under the
V-statistic, symmetry, permutation invariance, bounds, V/U relation, batched == per case."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from proseg.metrics import CONVENTIONS, ESTIMATORS, batch_case_metrics, case_metrics, generalized_energy_distance
from proseg.metrics.case import SCALAR_KEYS

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mask_sets(draw: st.DrawFn, max_k: int = 5, dyadic: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N, *S) bool and soft predictions (M, *S), 2D or 3D, small."""
    spatial = draw(st.sampled_from([(4, 4), (3, 5), (2, 3, 3)]))
    n = draw(st.integers(1, max_k))
    k = draw(st.integers(1, max_k))
    labels = draw(arrays(np.bool_, (n, *spatial)))
    if dyadic:  # multiples of 1/8: every sum is exact in float32, whatever the sample order
        preds = draw(arrays(np.float32, (k, *spatial), elements=st.sampled_from([i / 8 for i in range(9)])))
    else:
        preds = draw(arrays(np.float32, (k, *spatial), elements=st.floats(0.0, 1.0, width=32)))
    return labels, preds


@SETTINGS
@given(mask_sets(), st.sampled_from(CONVENTIONS))
def test_bounds(data: tuple[np.ndarray, np.ndarray], convention: str) -> None:
    labels, preds = data
    rec = case_metrics(labels, preds, convention=convention)
    for key in SCALAR_KEYS:
        if key not in ("ged", "s_ncc"):  # every other scalar lies in [0, 1]; those two are checked below
            assert -1e-12 <= rec[key] <= 1 + 1e-12, key
    assert -2.0 <= rec["ged"] <= 2.0
    assert all(math.isnan(v) or 0.0 <= v <= 1.0 + 1e-12 for v in rec["dice_per_rater_matched"])
    assert math.isnan(rec["s_ncc"]) or -1 - 1e-9 <= rec["s_ncc"] <= 1 + 1e-9
    # matching can never beat the per-label best
    assert rec["dice_match"] <= max(rec["dice_max"], rec["dice_max_reverse"]) + 1e-12


@SETTINGS
@given(arrays(np.bool_, st.tuples(st.integers(1, 5), st.integers(2, 5), st.integers(2, 5))))
def test_ged_of_a_set_against_itself_is_zero_under_v(masks: np.ndarray) -> None:
    rec = case_metrics(masks, masks.astype(np.float32))
    assert rec["ged"] == pytest.approx(0.0, abs=1e-12)
    assert rec["dice_match"] == pytest.approx(1.0) and rec["dice_max"] == pytest.approx(1.0)
    assert rec["dice_per_rater"] == pytest.approx([1.0] * len(masks))


@SETTINGS
@given(mask_sets(), st.sampled_from(CONVENTIONS), st.sampled_from(ESTIMATORS))
def test_ged_symmetric_for_binary_sets(data: tuple[np.ndarray, np.ndarray], convention: str, estimator: str) -> None:
    labels, preds = data
    binary = preds > 0.5
    ab = generalized_energy_distance(labels, binary, convention=convention, estimator=estimator)
    ba = generalized_energy_distance(binary, labels, convention=convention, estimator=estimator)
    assert float(ab.cross) == pytest.approx(float(ba.cross), abs=1e-12)
    assert float(ab.ged) == pytest.approx(float(ba.ged), abs=1e-12, nan_ok=True)


@SETTINGS
@given(mask_sets(dyadic=True), st.randoms(use_true_random=False), st.sampled_from(CONVENTIONS))
def test_permutation_invariance(data: tuple[np.ndarray, np.ndarray], rnd, convention: str) -> None:  # noqa: ANN001
    labels, preds = data
    pl = list(range(len(labels)))
    pp = list(range(len(preds)))
    rnd.shuffle(pl)
    rnd.shuffle(pp)
    a = case_metrics(labels, preds, convention=convention)
    b = case_metrics(labels[pl], preds[pp], convention=convention)
    keys = ["ged", "ged_cross", "ged_labels", "ged_preds", "dice_soft", "dice_max", "dice_max_reverse"]
    keys += ["dice_match", "ci_score", "s_ncc"]
    for key in keys:
        # S_NCC takes its M x P logarithms in float32: the sample order moves it by ~1e-8
        tol = 1e-6 if key == "s_ncc" else 1e-9
        assert b[key] == pytest.approx(a[key], abs=tol, nan_ok=True), key
    # Hungarian ties may pick other pairs with other per-rater values, but never another total.
    tot_a = math.fsum(v for v in a["dice_per_rater_matched"] if not math.isnan(v))
    tot_b = math.fsum(v for v in b["dice_per_rater_matched"] if not math.isnan(v))
    assert tot_b == pytest.approx(tot_a, abs=1e-9)


@SETTINGS
@given(mask_sets())
def test_v_and_u_within_terms_relation_standard(data: tuple[np.ndarray, np.ndarray]) -> None:
    # Standard convention: the diagonal distance is 0, so V = U * (K - 1) / K for each within-set term.
    labels, preds = data
    v = case_metrics(labels, preds, estimator="v")
    u = case_metrics(labels, preds, estimator="u")
    n, k = len(labels), len(preds)
    if n > 1:
        assert v["ged_labels"] == pytest.approx(u["ged_labels"] * (n - 1) / n, abs=1e-12)
    else:
        assert math.isnan(u["ged_labels"]) and v["ged_labels"] == 0.0
    if k > 1:
        assert v["ged_preds"] == pytest.approx(u["ged_preds"] * (k - 1) / k, abs=1e-12)
    assert v["ged_cross"] == u["ged_cross"]


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_batched_equals_per_case(b: int, n: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random((b, n, 5, 6)) > 0.6
    preds = rng.random((b, k, 5, 6)).astype(np.float32)
    batch = batch_case_metrics(labels, preds)
    for i in range(b):
        single = case_metrics(labels[i], preds[i])
        for key in ("ged", "dice_soft", "dice_max", "dice_match", "ci_score"):
            assert batch[i][key] == pytest.approx(single[key], abs=1e-12, nan_ok=True)
