"""Law-of-total-variance maps: golden values and total = rater + ambiguity."""

from __future__ import annotations

import pytest
import torch

from proseg.metrics.uncertainty import diverse_uncertainty, uncertainty_maps


def test_golden_two_raters_two_samples() -> None:
    # one pixel; rater 0 draws {0.2, 0.4}, rater 1 draws {0.6, 1.0}
    s = torch.tensor([[0.2, 0.4], [0.6, 1.0]]).reshape(2, 2, 1, 1)
    u = uncertainty_maps(s)
    assert u["rater_mean"].flatten().tolist() == pytest.approx([0.3, 0.8])
    assert u["mean"].item() == pytest.approx(0.55)
    assert u["rater"].item() == pytest.approx(0.0625)  # var of {0.3, 0.8}
    assert u["ambiguity"].item() == pytest.approx((0.01 + 0.04) / 2)  # mean of var{.2,.4}=.01, var{.6,1}=.04
    assert u["total"].item() == pytest.approx(0.0875)  # var of {.2,.4,.6,1.0}


def test_total_is_rater_plus_ambiguity_on_random_volumes() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.rand(4, 7, 3, 9, 11, generator=g)  # (R, K, D, H, W)
    u = uncertainty_maps(s)
    assert u["total"].shape == (3, 9, 11)
    torch.testing.assert_close(u["total"], u["rater"] + u["ambiguity"], atol=1e-6, rtol=1e-5)
    # raters that agree exactly leave no rater-attributable variance
    same = s[:1].expand(4, -1, -1, -1, -1)
    assert uncertainty_maps(same)["rater"].abs().max() < 1e-7
    # deterministic raters (K identical samples) leave no ambiguity
    det = s[:, :1].expand(-1, 7, -1, -1, -1)
    assert uncertainty_maps(det)["ambiguity"].abs().max() < 1e-7
    d = diverse_uncertainty(s[0])
    torch.testing.assert_close(d["total"], s[0].var(0, unbiased=False))


def test_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"\(R, K, \*S\)"):
        uncertainty_maps(torch.zeros(3, 4))
