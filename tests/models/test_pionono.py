"""Pionono: the maths that can be checked exactly (full-covariance KL, valid Cholesky factors, the folded head),
rater masking, sampling semantics and determinism. Tiny inputs, CPU."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import MultivariateNormal, kl_divergence

from proseg.models import create_model
from proseg.models.pionono import Pionono

R, C, H = 3, 1, 16


def _model(**overrides) -> Pionono:
    torch.manual_seed(0)
    model = create_model("pionono", in_channels=C, num_raters=R, preset="tiny", **overrides)
    assert isinstance(model, Pionono)
    return model


def _batch(b: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(H), indexing="ij")
    radii = torch.tensor([3.0, 5.0, 7.0])
    disc = ((yy - H / 2) ** 2 + (xx - H / 2) ** 2)[None] < radii[:, None, None] ** 2
    return {
        "image": torch.randn(b, C, H, H, generator=g),
        "masks": disc[None].expand(b, -1, -1, -1).float(),
        "rater_present": torch.tensor([[True, True, False], [True, False, True]])[:b],
    }


def test_model_kl_uses_the_posterior_tables() -> None:
    model = _model()
    lat = model.latent
    prior = MultivariateNormal(torch.zeros(lat.latent_dim), scale_tril=2.0 * torch.eye(lat.latent_dim))
    ref = kl_divergence(MultivariateNormal(lat.mu, scale_tril=lat.scale_tril()), prior)
    torch.testing.assert_close(model.kl_per_rater(), ref, rtol=1e-5, atol=1e-5)
    # initial posterior covariance is prior_std^2 I, as the reference
    torch.testing.assert_close(lat.covariance(), 4.0 * torch.eye(lat.latent_dim).expand(R, -1, -1))


def test_covariance_stays_positive_definite_under_large_steps() -> None:
    model = _model(latent_lr=1.0)  # 50x the reference's latent lr
    opt = torch.optim.Adam(model.param_groups(lr=1e-3))
    batch = _batch()
    for _ in range(4):
        opt.zero_grad()
        loss = model.loss(batch)["loss"]
        # push hard on the covariance: a term that wants every diagonal entry of L negative
        (loss + 100.0 * torch.diagonal(model.latent.scale_tril(), dim1=-2, dim2=-1).sum()).backward()
        opt.step()
    raw_diag = torch.diagonal(model.latent.raw_tril.detach(), dim1=-2, dim2=-1)
    assert (raw_diag < 0).all()  # an unconstrained scale_tril (the original) would now be invalid
    lower = model.latent.scale_tril().detach()
    assert torch.isfinite(lower).all()
    assert (torch.diagonal(lower, dim1=-2, dim2=-1) > 0).all()
    torch.linalg.cholesky(model.latent.covariance().detach().double())  # raises if not PD
    MultivariateNormal(model.latent.mu.detach(), scale_tril=lower, validate_args=True)
    assert torch.isfinite(model.kl_per_rater()).all()
    # even an absurd raw diagonal gives a valid factor (softplus + 1e-5 floor)
    with torch.no_grad():
        model.latent.raw_tril.diagonal(dim1=-2, dim2=-1).fill_(-1e4)
    assert (torch.diagonal(model.latent.scale_tril(), dim1=-2, dim2=-1) >= 1e-5).all()
    assert torch.isfinite(model.kl_per_rater()).all()


def test_folded_head_equals_tile_and_concat() -> None:
    model = _model()
    head = model.head
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, head.feature_channels, 5, 6, generator=g)
    z = torch.randn(2, 4, model.latent_dim, generator=g)
    ours = head(feats, z)
    tiled = z[..., None, None].expand(-1, -1, -1, 5, 6)
    x = torch.cat([feats[:, None].expand(-1, 4, -1, -1, -1), tiled], dim=2).flatten(0, 1)
    x = F.relu(head.first(x))
    for conv in head.hidden:
        x = F.relu(conv(x))
    ref = head.last(x).view(2, 4, 5, 6)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_loss_terms_and_absent_raters_ignored() -> None:
    model = _model()
    batch = _batch()
    out = model.loss(batch, generator=torch.Generator().manual_seed(5))
    assert set(out) == {"loss", "seg", "kl", "reg"}
    expected = out["seg"] + 5e-4 * out["kl"] + 1e-5 * out["reg"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    changed = dict(batch)
    masks = batch["masks"].clone()
    masks[0, 2] = 1.0 - masks[0, 2]  # rater 2 is absent for image 0
    masks[1, 1] = 1.0 - masks[1, 1]
    changed["masks"] = masks
    out2 = model.loss(changed, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out["loss"], out2["loss"])
    masks[0, 0] = 1.0 - masks[0, 0]  # a present rater does count
    out3 = model.loss(changed, generator=torch.Generator().manual_seed(5))
    assert (out3["seg"] - out["seg"]).abs() > 1e-4


@pytest.mark.parametrize("reduction", ["loss", "logits"])
def test_mc_reductions_and_gradients(reduction: str) -> None:
    model = _model(mc_reduction=reduction, seg_loss="bce")
    out = model.loss(_batch())
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert model.latent.mu.grad.abs().sum() > 0


def test_sampling_shapes_determinism_and_share_latent() -> None:
    model = _model().eval()
    img = _batch()["image"][:1].expand(3, -1, -1, -1)  # three copies of one image
    with torch.no_grad():
        a = model.sample_personalized(img, 4, torch.Generator().manual_seed(7))
        b = model.sample_personalized(img, 4, torch.Generator().manual_seed(7))
        c = model.sample_personalized(img, 4, torch.Generator().manual_seed(8))
        shared = model.sample_personalized(img, 4, torch.Generator().manual_seed(7), share_latent=True)
        div = model.sample_diverse(img, 5, torch.Generator().manual_seed(7))
        div_shared = model.sample_diverse(img, 5, torch.Generator().manual_seed(7), share_latent=True)
    assert a.shape == (3, R, 4, H, H) and div.shape == (3, 5, H, H)
    assert ((a >= 0) & (a <= 1)).all() and ((div >= 0) & (div <= 1)).all()
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a[0], a[1])  # independent latents per image
    torch.testing.assert_close(shared[0], shared[1])  # one latent per (rater, sample) across the batch
    torch.testing.assert_close(div_shared[0], div_shared[2])
    assert not torch.allclose(div[0], div[1])


def test_diverse_draws_come_from_the_rater_mixture() -> None:
    model = _model().eval()
    with torch.no_grad():  # well separated, nearly deterministic rater posteriors
        model.latent.mu.copy_(torch.tensor([[-6.0, 0.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, 6.0]]))
        model.latent.raw_tril.zero_()
        model.latent.raw_tril.diagonal(dim1=-2, dim2=-1).fill_(-20.0)  # L ~ 1e-5 I
        img = _batch()["image"][:1]
        per_rater = model.sample_personalized(img, 1)[0, :, 0]  # (R, H, W)
        div = model.sample_diverse(img, 12, torch.Generator().manual_seed(0))[0]  # (K, H, W)
    dist = (div[:, None] - per_rater[None]).abs().amax((-2, -1))  # (K, R)
    assert (dist.min(1).values < 1e-3).all()  # every draw is one rater's output
    assert len(set(dist.argmin(1).tolist())) > 1  # and not always the same rater


def test_param_groups_put_latent_at_its_own_lr() -> None:
    model = _model()
    groups = model.param_groups(lr=1e-4, weight_decay=1e-5)
    by_name = {g["name"]: g for g in groups}
    assert by_name["latent"]["lr"] == 0.02 and by_name["latent"]["weight_decay"] == 0.0
    assert {id(p) for p in by_name["latent"]["params"]} == {id(model.latent.mu), id(model.latent.raw_tril)}
    n_all = sum(1 for _ in model.parameters())
    assert sum(len(g["params"]) for g in groups) == n_all


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="mc_reduction"):
        _model(mc_reduction="mean")
    with pytest.raises(ValueError, match="head_layers"):
        _model(head_layers=1)
    with pytest.raises(ValueError, match="expects images"):
        _model().sample_personalized(torch.zeros(1, 2, 8, 8))


def test_rater_sampling_one_uses_a_present_rater() -> None:
    model = _model()
    with torch.no_grad():  # near-deterministic latents, so "one" and "all" see the same predictions
        model.latent.raw_tril.diagonal(dim1=-2, dim2=-1).fill_(-20.0)
    batch = _batch()
    batch["rater_present"] = torch.tensor([[True, False, False], [False, False, True]])
    out_all = model.loss(batch, generator=torch.Generator().manual_seed(0))
    model.rater_sampling = "one"
    out_one = model.loss(batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out_one["loss"], out_all["loss"], rtol=1e-4, atol=1e-5)
    batch["rater_present"] = torch.tensor([[True, True, True], [True, True, True]])
    a = model.loss(batch, generator=torch.Generator().manual_seed(3))["loss"]
    b = model.loss(batch, generator=torch.Generator().manual_seed(3))["loss"]
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="rater_sampling"):
        _model(rater_sampling="some")
