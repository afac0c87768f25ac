"""Losses: exact checks against closed forms, torch.distributions and the reference GDL definition; the registry of
segmentation-loss names; the weighted mean over pairs."""

import pytest
import torch
from torch.distributions import Dirichlet, MultivariateNormal, Normal, kl_divergence

from proseg.errors import ConfigError
from proseg.losses import (
    bce_loss,
    dirichlet_kl,
    full_gaussian_kl_isotropic,
    gaussian_kl,
    generalized_dice_loss,
    get_loss,
    list_losses,
    mask_channel_dice_loss,
    segmentation_loss,
    weighted_mean,
)


def test_dirichlet_kl_matches_torch_and_monte_carlo() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 8, generator=g, dtype=torch.float64) * 3 + 0.2
    b = torch.rand(3, 8, generator=g, dtype=torch.float64) * 3 + 0.2
    ours = dirichlet_kl(a, b)
    torch.testing.assert_close(ours, kl_divergence(Dirichlet(a), Dirichlet(b)))
    # Monte-Carlo estimate E_q[log q - log p] against the closed form (symmetric prior, as ProSeg).
    q, p = Dirichlet(a[0]), Dirichlet(torch.ones(8, dtype=torch.float64))
    torch.manual_seed(1)
    x = q.sample((200_000,)).clamp_min(1e-300)
    mc = (q.log_prob(x) - p.log_prob(x)).mean()
    assert abs(mc.item() - dirichlet_kl(a[0], 1.0).item()) < 0.02


def test_dirichlet_kl_zero_at_equality() -> None:
    a = torch.tensor([[1.3, 0.7, 2.0]])
    assert dirichlet_kl(a, a).abs().item() < 1e-6


def test_gaussian_kl_closed_form() -> None:
    mu, logvar = torch.tensor([0.5, -1.0]), torch.tensor([0.2, -0.3])
    prior_logvar = 1.0  # the reference stores 1.0 as a log-variance: prior variance e
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, torch.tensor(0.5 * prior_logvar).exp()))
    torch.testing.assert_close(gaussian_kl(mu, logvar, 0.0, prior_logvar), ref)
    assert gaussian_kl(torch.zeros(1), torch.zeros(1)).item() == 0.0


def test_gdl_hand_computed() -> None:
    # One 2-pixel pair, p = sigmoid(0) = 0.5 everywhere, target [1, 0].
    # fg: vol 1, w 1, inter 0.5, denom 0.5+0.5+1 = 2 -> dice 0.5; bg: same by symmetry -> loss 0.5.
    loss = generalized_dice_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
    assert abs(loss.item() - 0.5) < 1e-6


def test_gdl_weight_zero_removes_a_pair() -> None:
    logits = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    target = (torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    w = torch.tensor([1.0, 0.0, 1.0])
    for pooled in (True, False):
        a = generalized_dice_loss(logits, target, w, pooled=pooled)
        b = generalized_dice_loss(logits[[0, 2]], target[[0, 2]], None, pooled=pooled)
        torch.testing.assert_close(a, b)
    # the absent pair's garbage target must not matter
    target2 = target.clone()
    target2[1] = 1 - target2[1]
    torch.testing.assert_close(generalized_dice_loss(logits, target2, w), generalized_dice_loss(logits, target, w))


def test_bce_weighted() -> None:
    logits = torch.zeros(2, 3)
    target = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    assert abs(bce_loss(logits, target).item() - torch.log(torch.tensor(2.0)).item()) < 1e-6
    assert abs(bce_loss(logits, target, torch.tensor([1.0, 0.0])).item() - 0.6931472) < 1e-6


def test_channel_dice_pools_over_the_batch_and_weights_pairs() -> None:
    p = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])  # (B=2, C=1, 2 px)
    t = torch.tensor([[[1.0, 1.0]], [[1.0, 0.0]]])
    # pooled: sum pt = 1 + 0.5, sum p + t = 3 + 2 -> Dice 3/5
    assert float(mask_channel_dice_loss(p, t)) == pytest.approx(1 - 0.6)
    # second pair weighted 0: Dice 2*1/(1+2)
    assert float(mask_channel_dice_loss(p, t, torch.tensor([1.0, 0.0]))) == pytest.approx(1 - 2 / 3)
    assert float(mask_channel_dice_loss(p, t, torch.zeros(2))) == 0.0


def test_full_covariance_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    d = 5
    mu = torch.randn(4, d, generator=g, dtype=torch.float64) * 3
    lower = torch.tril(torch.randn(4, d, d, generator=g, dtype=torch.float64))
    lower.diagonal(dim1=-2, dim2=-1).copy_(torch.rand(4, d, generator=g, dtype=torch.float64) + 0.1)
    prior_std = 2.0
    ours = full_gaussian_kl_isotropic(mu, lower, prior_std)
    prior = MultivariateNormal(torch.zeros(d, dtype=torch.float64),
                               scale_tril=prior_std * torch.eye(d, dtype=torch.float64))
    ref = kl_divergence(MultivariateNormal(mu, scale_tril=lower), prior)
    torch.testing.assert_close(ours, ref)
    # zero at the prior itself
    zero = full_gaussian_kl_isotropic(torch.zeros(d), prior_std * torch.eye(d), prior_std)
    assert abs(zero.item()) < 1e-5


def test_loss_registry_names_and_dispatch() -> None:
    assert list_losses() == ["bce", "gdl", "gdl+bce", "gdl_per_sample"]
    logits = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    target = (torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    w = torch.tensor([1.0, 0.0, 1.0])
    expected = {
        "gdl": generalized_dice_loss(logits, target, w, pooled=True),
        "gdl_per_sample": generalized_dice_loss(logits, target, w, pooled=False),
        "bce": bce_loss(logits, target, w),
        "gdl+bce": generalized_dice_loss(logits, target, w) + bce_loss(logits, target, w),
    }
    for name, value in expected.items():
        assert torch.equal(get_loss(name)(logits, target, w), value), name
        assert torch.equal(segmentation_loss(name, logits, target, w), value), name


def test_unknown_loss_name_is_a_config_error_listing_the_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown seg_loss 'dice'; segmentation losses: bce, gdl, gdl\+bce"):
        get_loss("dice")
    with pytest.raises(ConfigError, match="unknown stage2_loss"):
        get_loss("dice", key="stage2_loss")
    with pytest.raises(ValueError):  # a ConfigError is a ValueError too
        segmentation_loss("nope", torch.zeros(1, 1), torch.zeros(1, 1))


def test_weighted_mean() -> None:
    v = torch.tensor([1.0, 2.0, 4.0])
    assert float(weighted_mean(v, torch.tensor([1.0, 0.0, 1.0]))) == 2.5
    assert float(weighted_mean(v, torch.zeros(3))) == 0.0  # nothing used: 0, not NaN


# --- energy score -----------------------------------------------------------------------------------------------
def test_energy_score_golden_case() -> None:
    from proseg.losses import energy_score

    # one pair, 4 pixels, y = [1, 1, 0, 0]; samples p1 = [1, 0, 0, 0], p2 = [1, 1, 1, 0]
    y = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    p = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]])
    # fit = (1 + 1) / 2 = 1; spread = |p1 - p2| summed = 2; ES = 1 - 0.5 * 2 = 0; area 2
    assert float(energy_score(p, y)) == pytest.approx(0.0)
    p_same = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]])
    assert float(energy_score(p_same, y)) == pytest.approx(1 / 2)  # fit 1, no spread, / area 2
    # an empty mask counts one pixel: two identical false-positive pixels cost 2
    assert float(energy_score(torch.tensor([[[1.0, 1.0, 0.0, 0.0]] * 2]), torch.zeros(1, 4))) == pytest.approx(2.0)
    # weights: a zero-weight pair contributes nothing, to the sum or the normaliser
    pp = torch.cat([p_same, torch.ones(1, 2, 4)])
    yy = torch.cat([y, torch.zeros(1, 4)])
    assert float(energy_score(pp, yy, torch.tensor([1.0, 0.0]))) == pytest.approx(1 / 2)
    assert float(energy_score(pp, yy, torch.zeros(2))) == 0.0


@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.9])
def test_energy_score_is_minimised_by_samples_at_the_outcome_rate(q: float) -> None:
    """Exact expectation over y ~ Bern(q) and two binary samples ~ Bern(pi) on one pixel: (pi - q)^2 + q(1 - q)."""
    from proseg.losses import energy_score

    def expected(pi: float) -> float:
        total = 0.0
        for y, py in ((1.0, q), (0.0, 1 - q)):
            for a, pa in ((1.0, pi), (0.0, 1 - pi)):
                for b, pb in ((1.0, pi), (0.0, 1 - pi)):
                    es = float(energy_score(torch.tensor([[[a], [b]]]), torch.tensor([[y]])))
                    total += py * pa * pb * es
        return total

    grid = [i / 20 for i in range(21)]
    values = [expected(pi) for pi in grid]
    for pi, v in zip(grid, values, strict=True):
        assert v == pytest.approx((pi - q) ** 2 + q * (1 - q), abs=1e-6)
    assert grid[values.index(min(values))] == pytest.approx(round(q * 20) / 20)


def test_energy_score_needs_two_samples_and_matching_shapes() -> None:
    from proseg.losses import energy_score

    with pytest.raises(ValueError, match="K >= 2"):
        energy_score(torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="target"):
        energy_score(torch.rand(2, 2, 4, 4), torch.rand(2, 4, 5))
