"""Prob. U-Net: the loss terms against hand-computed ones, fcomb, masking, sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Independent, Normal, kl_divergence

from proseg.models import NotSupportedError, create_model
from proseg.models._gaussian_nets import Fcomb

H = W = 16


def _batch(b: int = 2, r: int = 3, c: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(b, c, H, W, generator=g),
        "masks": (torch.rand(b, r, H, W, generator=g) > 0.6).float(),
        "rater_present": torch.ones(b, r, dtype=torch.bool),
    }


def _normal(mu: torch.Tensor, logvar: torch.Tensor) -> Independent:
    return Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)


def test_loss_matches_hand_computed_elbo() -> None:
    """All raters: seg = BCE summed over pixels, averaged over pairs; KL = torch.distributions' closed form."""
    model = create_model("prob_unet", in_channels=2, num_raters=3, preset="tiny", rater_sampling="all",
                         reg_weight=0.0, kl_weight=0.7).eval()
    batch = _batch(c=2)
    out = model.loss(batch, generator=torch.Generator().manual_seed(5))

    image, masks = batch["image"], batch["masks"]
    b, r = masks.shape[:2]
    with torch.no_grad():
        mu_p, lv_p = model.prior(image)
        post_in = torch.cat([image.repeat_interleave(r, 0), masks.reshape(b * r, 1, H, W) - 0.5], dim=1)
        mu_q, lv_q = model.posterior(post_in)
        kl = kl_divergence(_normal(mu_q, lv_q), _normal(mu_p.repeat_interleave(r, 0), lv_p.repeat_interleave(r, 0)))
        eps = torch.randn((b, r, model.latent_dim), generator=torch.Generator().manual_seed(5))
        z = mu_q.reshape(b, r, -1) + torch.exp(0.5 * lv_q.reshape(b, r, -1)) * eps
        logits = model.fcomb(model.backbone(image), z)
        seg = F.binary_cross_entropy_with_logits(logits, masks, reduction="sum") / (b * r)
    torch.testing.assert_close(out["kl"], kl.mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["seg"], seg, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["loss"].detach(), seg + 0.7 * kl.mean(), rtol=1e-5, atol=1e-4)
    assert float(out["reg"]) == 0.0


def test_fcomb_equals_tiling_and_concatenation() -> None:
    torch.manual_seed(0)
    fcomb = Fcomb(feat_channels=5, latent_dim=3, width=4, num_convs=4)
    feats, z = torch.randn(2, 5, 6, 7), torch.randn(2, 3, 3)
    out = fcomb(feats, z)
    for k in range(3):
        tiled = z[:, k, :, None, None].expand(2, 3, 6, 7)
        x = F.relu(fcomb.first(torch.cat([feats, tiled], dim=1)))
        for conv in fcomb.hidden:
            x = F.relu(conv(x))
        torch.testing.assert_close(out[:, k], fcomb.last(x)[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["one", "all"])
def test_absent_raters_contribute_nothing(mode: str) -> None:
    model = create_model("prob_unet", in_channels=1, num_raters=3, preset="tiny", rater_sampling=mode)
    batch = _batch()
    batch["rater_present"] = torch.tensor([[True, False, True], [False, True, False]])
    other = dict(batch, masks=batch["masks"].clone())
    other["masks"][0, 1] = 1.0 - other["masks"][0, 1]  # change only absent raters' masks
    other["masks"][1, 0] = 1.0
    a = model.loss(batch, generator=torch.Generator().manual_seed(3))
    b = model.loss(other, generator=torch.Generator().manual_seed(3))
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    present_changed = dict(batch, masks=batch["masks"].clone())
    present_changed["masks"][1, 1] = 1.0 - present_changed["masks"][1, 1]
    c = model.loss(present_changed, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(a["seg"], c["seg"])


def test_every_parameter_gets_a_gradient_and_gdl_option() -> None:
    model = create_model("prob_unet", in_channels=3, num_raters=2, preset="tiny", seg_loss="gdl")
    batch = _batch(c=3, r=2)
    batch["rater_present"][1] = False
    out = model.loss(batch, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "seg", "kl", "reg"}
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_diverse_sampling_shapes_determinism_and_shared_latent() -> None:
    model = create_model("prob_unet", in_channels=1, num_raters=2, preset="tiny").eval()
    img = torch.randn(1, 1, H, W).expand(3, 1, H, W).contiguous()  # three identical slices
    with torch.no_grad():
        s1 = model.sample_diverse(img, 4, torch.Generator().manual_seed(9))
        s2 = model.sample_diverse(img, 4, torch.Generator().manual_seed(9))
        shared = model.sample_diverse(img, 4, torch.Generator().manual_seed(9), share_latent=True)
    assert s1.shape == (3, 4, H, W) and s1.dtype == img.dtype
    assert float(s1.min()) >= 0.0 and float(s1.max()) <= 1.0
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(shared[0], shared[2])  # one draw for the whole volume
    assert not torch.allclose(s1[0], s1[2])  # independent draws per slice
    assert not torch.allclose(s1[0, 0], s1[0, 1])
    with pytest.raises(NotSupportedError, match="personalized"):
        model.sample_personalized(img, 2)
    assert model.supports_diverse and not model.supports_personalized


def test_presets_and_bad_arguments() -> None:
    ref = create_model("prob_unet", in_channels=1, num_raters=4, preset="reference")
    assert ref.backbone.out_channels == 16 and ref.latent_dim == 6 and ref.seg_loss == "gdl"
    assert ref.fcomb.first.out_channels == 16 and ref.mask_shift == 0.0
    with pytest.raises(ValueError, match="rater_sampling"):
        create_model("prob_unet", preset="tiny", rater_sampling="some")
    with pytest.raises(ValueError, match="segmentation loss"):
        create_model("prob_unet", preset="tiny", seg_loss="dice")
