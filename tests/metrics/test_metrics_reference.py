"""``convention="reference"`` against numbers produced by running the *published* metric code.

``reference_fixture.json`` was written by ``make_reference_fixture.py``, which ran D-Persona/ProSeg's
``lib/metrics_set.py`` (AI4MOL/ProSeg @ 5ac653f) and PHiSeg's ``utils.py`` (baumgach/PHiSeg-code @ c43f3b3)
outside this repository on the arrays of ``reference_cases.py``. Tolerance 1e-6 (the published Dice is float32).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from proseg.metrics import case_metrics
from tests.metrics import reference_cases as rc

FIXTURE = json.loads((Path(__file__).resolve().parent / "reference_fixture.json").read_text())["cases"]
TOL = 1e-6


@pytest.fixture(scope="module")
def scored() -> dict[str, tuple[dict, dict, dict]]:
    out = {}
    for spec in rc.CASES:
        labels, preds = rc.make_case(spec)
        assert rc.array_digest(labels, preds) == FIXTURE[spec.name]["digest"], (
            f"{spec.name}: the case generator no longer reproduces the arrays the fixture was computed on; "
            "regenerate the fixture with make_reference_fixture.py"
        )
        out[spec.name] = (
            FIXTURE[spec.name],
            case_metrics(labels, preds, convention="reference"),
            case_metrics(labels, preds, convention="standard"),
        )
    return out


def test_fixture_covers_every_case() -> None:
    assert set(FIXTURE) == {s.name for s in rc.CASES}


@pytest.mark.parametrize("name", [s.name for s in rc.CASES])
def test_reference_convention_matches_published_code(scored: dict, name: str) -> None:
    ref, ours, _ = scored[name]
    for key in ("ged", "ged_cross", "ged_labels", "ged_preds", "dice_soft"):
        assert ours[key] == pytest.approx(ref[key], abs=TOL), key
    if "dice_at_all_error" in ref:
        # The published dice_at_all indexes col_ind[i] for every label and crashes when N > M; we report the
        # mean over the min(N, M) Hungarian pairs and NaN for unmatched raters instead.
        assert ref["dice_at_all_error"].startswith("IndexError")
        assert ours["num_labels"] > ours["num_predictions"]
        assert (
            sum(math.isnan(v) for v in ours["dice_per_rater_matched"]) == ours["num_labels"] - ours["num_predictions"]
        )
        return
    for key in ("dice_max", "dice_max_reverse", "dice_match"):
        assert ours[key] == pytest.approx(ref[key], abs=TOL), key
    # Dice_each (is_test=False) is the Hungarian-matched per-rater Dice ...
    assert ours["dice_per_rater_matched"] == pytest.approx(ref["dice_each"], abs=TOL)
    # ... and is_test=True the index-aligned one.
    if "dice_each_is_test" in ref:
        assert ours["dice_per_rater"] == pytest.approx(ref["dice_each_is_test"], abs=TOL)


@pytest.mark.parametrize("name", [s.name for s in rc.CASES])
def test_standard_v_ged_and_s_ncc_match_phiseg(scored: dict, name: str) -> None:
    ref, _, std = scored[name]
    assert std["ged"] == pytest.approx(ref["phiseg_ged"], abs=1e-9)
    # PHiSeg computes the cross-entropies of its float32 samples in float32, we take the logs in float32 and
    # the rest in float64: agreement to float32 precision.
    assert std["s_ncc"] == pytest.approx(ref["phiseg_s_ncc"], abs=1e-6)


def test_conventions_differ_exactly_where_empty_masks_are() -> None:
    # The quirk: with an empty rater, the published GED puts two empty masks (and an empty mask and itself)
    # at distance 1, so it differs from PHiSeg's; without empty masks the two agree.
    assert FIXTURE["one_empty_rater"]["ged"] != pytest.approx(FIXTURE["one_empty_rater"]["phiseg_ged"], abs=1e-3)
    assert FIXTURE["2d_n4_m10"]["ged"] == pytest.approx(FIXTURE["2d_n4_m10"]["phiseg_ged"], abs=1e-6)
