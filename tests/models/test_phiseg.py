"""PHiSeg: the hierarchical ELBO against a hand computation, latent sizes, conditioning, masking, sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from proseg.models import NotSupportedError, create_model
from proseg.models._utils import cached_inference_copy
from proseg.models.phiseg import PHiSeg

H = W = 16
SMALL = {"backbone_cfg": {"widths": (4, 6, 8), "norm": True}, "latent_levels": 2, "zdim": 2, "convs_per_level": 1,
         "ups_width": 4}


def _batch(b: int = 2, r: int = 3, c: int = 1, seed: int = 0, size: tuple[int, int] = (H, W)) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(b, c, *size, generator=g),
        "masks": (torch.rand(b, r, *size, generator=g) > 0.6).float(),
        "rater_present": torch.ones(b, r, dtype=torch.bool),
    }


def test_loss_matches_hand_computed_hierarchical_elbo() -> None:
    """Every present pair; seg_l = BCE(sum of the levels >= l) summed over pixels; KL_l = 4**l * closed form."""
    model = create_model("phiseg", in_channels=2, num_raters=2, preset="tiny", rater_sampling="all", **SMALL).eval()
    batch = _batch(c=2, r=2)
    out = model.loss(batch, generator=torch.Generator().manual_seed(7))

    image, masks = batch["image"], batch["masks"]
    s = 4  # B * R pairs
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        post_in = torch.cat([image.repeat_interleave(2, 0), masks.reshape(s, 1, H, W) - 0.5], dim=1)
        pyr = model.posterior.encode(post_in)
        # latent level l lives at resolution level l + 1 (3 resolution levels, 2 latent levels): 8x8 and 4x4
        eps1 = torch.randn((s, 2, 4, 4), generator=g)  # the coarsest level is drawn first
        eps0 = torch.randn((s, 2, 8, 8), generator=g)
        z, mu_q, lv_q = model.posterior(pyr, 1, eps=[eps0, eps1])
        torch.testing.assert_close(z[1], mu_q[1] + torch.exp(0.5 * lv_q[1]) * eps1, rtol=1e-4, atol=1e-5)
        _, mu_p, lv_p = model.prior(model.prior.encode(image), 2, z_cond=z)
        levels = model.likelihood(z, [f.shape[-2:] for f in pyr])
    assert [t.shape for t in levels] == [(s, H, W)] * 2
    tgt = masks.reshape(s, H, W)
    seg1 = F.binary_cross_entropy_with_logits(levels[1], tgt, reduction="sum") / s
    seg0 = F.binary_cross_entropy_with_logits(levels[0] + levels[1], tgt, reduction="sum") / s
    kls = []
    for lvl in range(2):
        q = Normal(mu_q[lvl], torch.exp(0.5 * lv_q[lvl]))
        p = Normal(mu_p[lvl], torch.exp(0.5 * lv_p[lvl]))
        kls.append(4.0**lvl * kl_divergence(q, p).flatten(1).sum(1).mean())
    torch.testing.assert_close(out["seg_l0"], seg0, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out["seg_l1"], seg1, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out["kl_l0"], kls[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["kl_l1"], kls[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["loss"].detach(), seg0 + seg1 + kls[0] + kls[1], rtol=1e-4, atol=1e-3)


def test_prior_conditions_finer_levels_on_the_given_latents() -> None:
    model = create_model("phiseg", in_channels=1, num_raters=1, preset="tiny", **SMALL).eval()
    image = torch.randn(2, 1, H, W)
    with torch.no_grad():
        pyr = model.prior.encode(image)
        z_a = [torch.zeros(6, 2, 8, 8), torch.zeros(6, 2, 4, 4)]
        z_b = [torch.zeros(6, 2, 8, 8), torch.ones(6, 2, 4, 4)]
        _, mu_a, lv_a = model.prior(pyr, 3, z_cond=z_a)
        _, mu_b, lv_b = model.prior(pyr, 3, z_cond=z_b)
    assert mu_a[1].shape == (6, 2, 4, 4) and mu_a[0].shape == (6, 2, 8, 8)
    torch.testing.assert_close(mu_a[1], mu_b[1])  # the coarsest level depends on the image only
    torch.testing.assert_close(mu_a[1][0], mu_a[1][2])  # and is shared by the 3 rows of image 0
    assert not torch.allclose(mu_a[0], mu_b[0])  # finer levels depend on the level above


def test_options_deep_supervision_and_weighting() -> None:
    model = create_model("phiseg", in_channels=1, num_raters=2, preset="tiny", deep_supervision=False,
                         exponential_weighting=False)
    out = model.loss(_batch(r=2), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "seg", "kl", "seg_l0", "kl_l0", "kl_l1"}
    assert model.level_weights() == [1.0, 1.0]
    five = create_model("phiseg", preset="tiny", backbone_cfg={"widths": (2,) * 6}, latent_levels=5)
    assert five.level_weights() == [1.0, 4.0, 16.0, 64.0, 256.0]


@pytest.mark.parametrize("mode", ["one", "all"])
def test_every_parameter_gets_a_gradient_and_absent_raters_contribute_nothing(mode: str) -> None:
    model = create_model("phiseg", in_channels=3, num_raters=3, preset="tiny", rater_sampling=mode)
    batch = _batch(c=3)
    batch["rater_present"] = torch.tensor([[True, False, True], [False, True, False]])
    out = model.loss(batch, generator=torch.Generator().manual_seed(3))
    out["loss"].backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    model.eval()
    changed = dict(batch, masks=batch["masks"].clone())
    changed["masks"][0, 1] = 1.0 - changed["masks"][0, 1]
    changed["masks"][1, 2] = 1.0
    a = model.loss(batch, generator=torch.Generator().manual_seed(3))
    b = model.loss(changed, generator=torch.Generator().manual_seed(3))
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_sampling_shapes_determinism_shared_latent_and_errors() -> None:
    model = create_model("phiseg", in_channels=1, num_raters=2, preset="tiny", **SMALL).eval()
    img = torch.randn(1, 1, 15, 13).expand(3, 1, 15, 13).contiguous()  # odd sizes work (ceil pooling)
    with torch.no_grad():
        a = model.sample_diverse(img, 4, torch.Generator().manual_seed(2))
        b = model.sample_diverse(img, 4, torch.Generator().manual_seed(2))
        shared = model.sample_diverse(img, 4, torch.Generator().manual_seed(2), share_latent=True)
    assert a.shape == (3, 4, 15, 13) and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(shared[0], shared[2])
    assert not torch.allclose(a[0], a[2]) and not torch.allclose(a[0, 0], a[0, 1])
    with pytest.raises(NotSupportedError, match="personalized"):
        model.sample_personalized(img, 1)
    assert model.supports_diverse and not PHiSeg.supports_personalized
    with pytest.raises(ValueError, match="at least 4x4"):
        model.sample_diverse(torch.randn(1, 1, 3, 8))
    with pytest.raises(ValueError, match="backbone='unet'"):
        create_model("phiseg", preset="tiny", backbone="resnet34_unet")
    with pytest.raises(ValueError, match="latent_levels"):
        create_model("phiseg", preset="tiny", latent_levels=3)


def test_inference_sampling_folds_batchnorm_without_changing_the_samples() -> None:
    """Without gradients in eval mode PHiSeg samples through a BatchNorm-folded, channels-last copy in runs of
    samples; the numbers are those of the plain network (with BatchNorm's running statistics)."""
    model = create_model("phiseg", in_channels=1, num_raters=2, preset="tiny", **SMALL)
    model.train()
    for _ in range(3):  # running statistics away from the (0, 1) initialisation
        model.loss(_batch(r=2, seed=4), torch.Generator().manual_seed(0))
    for m in model.modules():  # and non-trivial affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model.eval()
    img = torch.randn(2, 1, H, W)
    with torch.no_grad():
        fast = model.sample_diverse(img, 5, torch.Generator().manual_seed(1))
    with torch.enable_grad():  # the plain path: gradients on
        plain = model.sample_diverse(img, 5, torch.Generator().manual_seed(1)).detach()
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the model itself is untouched
    big = 128 * 128 * 10 // (2 * H * W) + 3  # more samples than one run holds: the runs see the same draws
    with torch.no_grad():
        many = model.sample_diverse(img, big, torch.Generator().manual_seed(1))
        # all samples in one pass, by hand: the draws in the same order, every level's at once
        g = torch.Generator().manual_seed(1)
        pyr = model.prior.encode(img)
        d = len(model.widths) - model.latent_levels
        eps = [img] * model.latent_levels
        for i in reversed(range(model.latent_levels)):
            eps[i] = torch.randn(2, big, model.zdim, *pyr[i + d].shape[-2:], generator=g).flatten(0, 1)
        z, _, _ = model.prior(pyr, big, eps=eps)
        logits = model._accumulate(model.likelihood(z, [f.shape[-2:] for f in pyr]))[0]
    torch.testing.assert_close(many, torch.sigmoid(logits).reshape(2, big, H, W), rtol=1e-4, atol=1e-5)
    # the folded copy is made once per set of weights, and again when they change
    first = cached_inference_copy(model.prior)
    with torch.no_grad():
        model.sample_diverse(img, 2, torch.Generator().manual_seed(1))
        assert cached_inference_copy(model.prior) is first
        next(model.likelihood.parameters()).add_(0.5)
        moved = model.sample_diverse(img, 5, torch.Generator().manual_seed(1))
    with torch.enable_grad():  # the plain path with the changed weights
        plain_after = model.sample_diverse(img, 5, torch.Generator().manual_seed(1)).detach()
    assert cached_inference_copy(model.prior) is first  # the prior's weights did not change
    assert not torch.allclose(moved, fast)
    torch.testing.assert_close(moved, plain_after, rtol=1e-4, atol=1e-5)
