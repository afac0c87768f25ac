"""ProSeg maths and options: Dirichlet sampling/KL, Gaussian KL, classifier CE on logits, presets, sampling modes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from proseg.losses import dirichlet_kl
from proseg.models import create_model
from proseg.models.proseg import ProSeg, RaterConvStack, SegHead, sample_dirichlet, sample_gamma

H = W = 16


def tiny(num_raters: int = 3, in_channels: int = 1, **kw) -> ProSeg:
    torch.manual_seed(0)
    model = create_model("proseg", in_channels=in_channels, num_raters=num_raters, preset="tiny", **kw)
    assert isinstance(model, ProSeg)
    return model


def batch(num_raters: int = 3, in_channels: int = 1, b: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    masks = (torch.rand(b, num_raters, H, W, generator=g) > 0.5).float()
    return {"image": torch.randn(b, in_channels, H, W, generator=g), "masks": masks,
            "rater_present": torch.ones(b, num_raters, dtype=torch.bool)}


# --- Dirichlet / Gamma sampling ---------------------------------------------------------------------------------
def test_dirichlet_sampling_uses_only_the_generator_and_is_deterministic() -> None:
    alpha = torch.tensor([[0.3, 1.0, 2.5], [5.0, 0.7, 1.3]])
    state = torch.get_rng_state()
    a = sample_dirichlet(alpha, torch.Generator().manual_seed(3))
    b = sample_dirichlet(alpha, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was consumed"
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_dirichlet(alpha, torch.Generator().manual_seed(4)))
    torch.testing.assert_close(a.sum(-1), torch.ones(2))
    assert (a > 0).all()


def test_dirichlet_moments_and_pathwise_gradient_match_the_analytic_values() -> None:
    alpha = torch.tensor([0.5, 1.3, 3.0], dtype=torch.float64, requires_grad=True)
    n = 40000
    tau = sample_dirichlet(alpha.expand(n, 3), torch.Generator().manual_seed(0))
    a0 = alpha.detach().sum()
    mean = alpha.detach() / a0
    var = mean * (1 - mean) / (a0 + 1)
    torch.testing.assert_close(tau.detach().mean(0), mean, atol=float(4 * (var / n).sqrt().max()), rtol=0)
    torch.testing.assert_close(tau.detach().var(0), var, rtol=0.05, atol=0)
    # d E[tau_0] / d alpha_j = (delta_0j - mean_0) / a0
    tau[:, 0].mean().backward()
    expected = (torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) - mean[0]) / a0
    torch.testing.assert_close(alpha.grad, expected, atol=0.01, rtol=0)


def test_gamma_sampling_mean_and_gradient_for_small_and_large_shape() -> None:
    for a_val in (0.2, 4.0):
        alpha = torch.full((30000,), a_val, dtype=torch.float64, requires_grad=True)
        g = sample_gamma(alpha, torch.Generator().manual_seed(1))
        assert abs(float(g.detach().mean()) - a_val) < 4 * math.sqrt(a_val / 30000)
        g.sum().backward()  # d E[g] / d alpha = 1 for Gamma(alpha, 1)
        assert abs(float(alpha.grad.sum()) / 30000 - 1.0) < 0.03


def test_dirichlet_kl_matches_monte_carlo() -> None:
    alpha_q = torch.tensor([1.313, 0.744, 0.744, 2.0], dtype=torch.float64)
    alpha_p = 1.0
    n = 200000
    tau = sample_dirichlet(alpha_q.expand(n, 4), torch.Generator().manual_seed(2))
    q = torch.distributions.Dirichlet(alpha_q)
    p = torch.distributions.Dirichlet(torch.full((4,), alpha_p, dtype=torch.float64))
    log_ratio = q.log_prob(tau) - p.log_prob(tau)
    mc, se = float(log_ratio.mean()), float(log_ratio.std() / math.sqrt(n))
    exact = float(dirichlet_kl(alpha_q, alpha_p))
    assert abs(mc - exact) < 4 * se + 1e-3, (mc, exact, se)


# --- Gaussian KL, prior variance -------------------------------------------------------------------------------
def _force_stats(model: ProSeg, mu: float, logvar: float) -> None:
    """Make every rater's statistic head output constant (mu, logvar) maps."""
    last_w, last_b = model.stat_heads.weights[-1], model.stat_heads.biases[-1]
    zc = model.z_channels
    with torch.no_grad():
        last_w.zero_()
        last_b[:, :zc] = mu
        last_b[:, zc:] = logvar


@pytest.mark.parametrize("prior_variance", [1.0, math.e, 0.25])
def test_gaussian_kl_term_is_the_closed_form(prior_variance: float) -> None:
    model = tiny(prior_variance=prior_variance)
    _force_stats(model, mu=0.7, logvar=-0.4)
    out = model.loss(batch())
    s2 = prior_variance
    expected = 0.5 * (math.log(s2) + 0.4 + (math.exp(-0.4) + 0.7**2) / s2 - 1.0)
    assert abs(float(out["kl_z"].detach()) - expected) < 1e-5


def test_reference_prior_variance_is_e_golden_value() -> None:
    # The reference stores 1.0 as the prior's log-variance: KL(N(0,1) || N(0, e)) = 0.5 (1 + 1/e - 1) = 0.5/e
    model = tiny(prior_variance=ProSeg.PRESETS["reference"]["prior_variance"])
    _force_stats(model, mu=0.0, logvar=0.0)
    assert abs(float(model.loss(batch())["kl_z"].detach()) - 0.5 / math.e) < 1e-6


def test_kl_tau_is_the_closed_form_of_each_rater() -> None:
    model = tiny(num_raters=2, alpha0=2.0)
    out = model.loss(batch(num_raters=2))
    conc = model.tau.concentration().detach()
    expected = dirichlet_kl(conc, 2.0).mean()  # every rater present in both images ("all")
    torch.testing.assert_close(out["kl_tau"].detach(), expected)


def test_concentration_init_matches_the_reference() -> None:
    model = create_model("proseg", in_channels=1, num_raters=4, preset="tiny", tau_dim=8)
    raw = model.tau.raw_concentration.detach()
    expected = torch.full((4, 8), 0.1)
    for r in range(4):
        expected[r, r] = expected[r, r + 4] = 1.0
    torch.testing.assert_close(raw, expected)


# --- classifier ---------------------------------------------------------------------------------------------------
def test_classifier_cross_entropy_is_on_logits() -> None:
    model = tiny(num_raters=2, rater_sampling="one")
    last = model.tau.classifier[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([20.0, -20.0]))  # certain of rater 0
    b = batch(num_raters=2)
    b["rater_present"] = torch.tensor([[True, False], [True, False]])  # only rater 0 is ever the target
    ce = float(model.loss(b)["ce"].detach())
    assert ce < 1e-6  # a softmax applied twice would give log(1 + e^-1) = 0.313
    b["rater_present"] = torch.tensor([[False, True], [False, True]])
    assert abs(float(model.loss(b)["ce"].detach()) - 40.0) < 1e-3  # CE of logit gap 40


# --- architecture ---------------------------------------------------------------------------------------------------
def test_reference_preset_parameter_count() -> None:
    model = create_model("proseg", in_channels=1, num_raters=4, preset="reference")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 48.96e6) / 48.96e6 < 0.01
    assert n == 48_964_102  # 2 x smp Unet-resnet34 (C=1 and C=8, no seg head) + heads + tau module


def test_default_is_the_constructor_and_the_documented_size() -> None:
    model = ProSeg(1, 4)  # = create_model("proseg", in_channels=1, num_raters=4): docs/models.md's 576,377
    assert sum(p.numel() for p in model.parameters()) == 576_377
    assert model.presence
    assert model.rater_sampling == "one" and model.diverse_mode == "per_rater"
    assert model.scale == 2 and model.scale_head == "smooth" and model.es_weight == 0.0
    assert float(model.stat_heads.biases[-1][0, model.z_channels].detach()) == -4.0  # z_logvar_init


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("recon_decoder", ["light", "backbone"])
def test_reconstruction_has_the_image_channel_count(in_channels: int, recon_decoder: str) -> None:
    model = tiny(in_channels=in_channels, recon_decoder=recon_decoder)
    x_hat = model.reconstruct(torch.randn(2, in_channels, H, W), torch.Generator().manual_seed(0))
    assert tuple(x_hat.shape) == (2, 3, in_channels, H, W)
    assert torch.isfinite(model.loss(batch(in_channels=in_channels))["recon"])


def test_rater_conv_stack_gathered_path_equals_batched_path() -> None:
    torch.manual_seed(0)
    for shared in (True, False):
        stack = RaterConvStack(3, (4, 5, 6), shared_input=shared)
        x = torch.randn(2, 4, 8, 8) if shared else torch.randn(2, 3, 4, 8, 8)
        full = stack(x, None)
        gathered = stack(x, torch.arange(3).expand(2, 3))
        torch.testing.assert_close(gathered, full, rtol=1e-5, atol=1e-5)
        # one rater per image picks the matching slice of the batched output
        if shared:
            pick = torch.tensor([[2], [0]])
            torch.testing.assert_close(stack(x, pick)[:, 0], full[torch.arange(2), pick[:, 0]], rtol=1e-5, atol=1e-5)


def test_seg_head_folded_bias_equals_tiled_concatenation() -> None:
    torch.manual_seed(0)
    head = SegHead(z_channels=4, tau_dim=3, hidden=5, num_layers=3)
    z = torch.randn(2, 3, 6, 7, 4)  # (B, K, H, W, Zc)
    tau = torch.rand(2, 3, 3)
    tiled = tau[:, :, None, None, :].expand(2, 3, 6, 7, 3)
    h = torch.cat([z, tiled], -1)
    for layer in head.layers:
        h = F.relu(layer(h))
    expected = head.last(h).squeeze(-1)
    torch.testing.assert_close(head(z, tau), expected, rtol=1e-5, atol=1e-5)


def test_one_rater_sampling_gives_every_parameter_a_gradient_and_skips_empty_images() -> None:
    model = tiny(rater_sampling="one")
    b = batch()
    b["rater_present"] = torch.tensor([[False, False, False], [False, True, False]])
    out = model.loss(b)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert torch.isfinite(out["loss"])
    b["rater_present"][:] = False
    torch.testing.assert_close(model.loss(b)["seg"].detach(), torch.tensor(0.0))


def test_param_groups_put_the_tau_module_on_its_own_learning_rate() -> None:
    model = tiny()
    groups = model.param_groups(5e-5, weight_decay=1e-4)
    assert [g["lr"] for g in groups] == [5e-5, 2e-3]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert id(model.tau.raw_concentration) in {id(p) for p in groups[1]["params"]}


def test_bad_options_raise() -> None:
    for kw in ({"rater_sampling": "some"}, {"diverse_mode": "x"}, {"recon_decoder": "big"}, {"seg_loss": "dice9"},
               {"prior_variance": 0.0}, {"alpha0": -1.0}):
        with pytest.raises(ValueError):
            tiny(**kw)


# --- sampling modes ----------------------------------------------------------------------------------------------
def _rater_coded(model: ProSeg) -> ProSeg:
    """Z = rater-specific constant (no noise), head ignores tau: the output identifies the rater used."""
    zc, R = model.z_channels, model.num_raters
    with torch.no_grad():
        model.stat_heads.weights[-1].zero_()
        model.stat_heads.biases[-1][:, :zc] = torch.linspace(-2, 2, R)[:, None]
        model.stat_heads.biases[-1][:, zc:] = -40.0
        model.head.layers[0].weight[:, zc:] = 0.0
    return model.eval()


def test_diverse_per_rater_splits_samples_evenly_over_raters() -> None:
    model = _rater_coded(tiny(num_raters=3, diverse_mode="per_rater", presence=False))
    x = torch.randn(2, 1, H, W)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        per = model.sample_personalized(x, 1, g)[:, :, 0]  # (B, R, H, W)
        div = model.sample_diverse(x, 7, g)  # raters 0,0,0,1,1,2,2
    for k, r in enumerate([0, 0, 0, 1, 1, 2, 2]):
        torch.testing.assert_close(div[:, k], per[:, r])


@pytest.mark.parametrize("noise_scale", [1, 2])
@pytest.mark.parametrize("mode", ["personalized", "per_rater", "prior_classifier"])
def test_sample_draws_do_not_depend_on_the_chunking(mode: str, noise_scale: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each sample's Z has its own seed, so the chunk budget (a speed knob) never changes the samples."""
    model = create_model("proseg", in_channels=1, num_raters=3, z_noise_scale=noise_scale,
                         diverse_mode="prior_classifier" if mode == "personalized" else mode).eval()
    x = torch.randn(2, 1, 24, 24)
    chunks = ProSeg._chunks

    def draw(budget: int) -> torch.Tensor:
        monkeypatch.setattr(ProSeg, "_chunks", staticmethod(lambda K, t, budget=budget: chunks(K, t, budget)))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            if mode == "personalized":
                return model.sample_personalized(x, 5, g)
            return model.sample_diverse(x, 7, g)

    one, all_at_once = draw(1), draw(1 << 30)
    assert len(chunks(7, 2 * 3 * 12 * 12 * 16, 1)) == 7  # budget 1 really is one sample a chunk
    torch.testing.assert_close(one, all_at_once, rtol=0, atol=0)


def test_sample_draws_do_not_depend_on_the_thread_count() -> None:
    """Each sample's Z comes from its own seed; with several threads the draws run in parallel, same numbers."""
    model = create_model("proseg", in_channels=1, num_raters=3).eval()
    x = torch.randn(1, 1, 32, 32)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                outs.append(model.sample_diverse(x, 9, torch.Generator().manual_seed(5)))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(outs[0], outs[1])
    assert outs[0].std(dim=1).mean() > 0  # the samples do differ


@pytest.mark.parametrize("diverse_rater", ["argmax", "sample"])
def test_diverse_prior_classifier_uses_the_classifier_rater(diverse_rater: str) -> None:
    model = _rater_coded(tiny(num_raters=3, diverse_mode="prior_classifier", diverse_rater=diverse_rater,
                                presence=False))
    with torch.no_grad():
        model.tau.classifier[-1].weight.zero_()
        model.tau.classifier[-1].bias.copy_(torch.tensor([-30.0, -30.0, 30.0]))  # p(r=2 | tau) = 1
    x = torch.randn(2, 1, H, W)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        per = model.sample_personalized(x, 1, g)[:, 2, 0]
        div = model.sample_diverse(x, 5, g)
    torch.testing.assert_close(div, per[:, None].expand_as(div))


def test_share_latent_shares_tau_across_the_batch() -> None:
    model = tiny(num_raters=2)
    with torch.no_grad():
        model.stat_heads.biases[-1][:, model.z_channels:] = -40.0  # Z deterministic: only tau varies
        model.stat_heads.weights[-1][:, model.z_channels:] = 0.0
    model.eval()
    x = torch.randn(1, 1, H, W).expand(3, 1, H, W).contiguous()  # three identical slices
    for fn in (model.sample_personalized, model.sample_diverse):
        with torch.no_grad():
            shared = fn(x, 4, torch.Generator().manual_seed(0), share_latent=True)
            own = fn(x, 4, torch.Generator().manual_seed(0), share_latent=False)
        torch.testing.assert_close(shared[0], shared[2], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(own[0], own[2], rtol=1e-5, atol=1e-6)


def test_personalized_samples_differ_between_raters_and_draws() -> None:
    model = tiny(num_raters=3).eval()
    with torch.no_grad():
        out = model.sample_personalized(torch.randn(1, 1, H, W), 2, torch.Generator().manual_seed(0))
    assert not torch.allclose(out[0, 0, 0], out[0, 0, 1])
    assert not torch.allclose(out[0, 0, 0], out[0, 1, 0])


def test_z_logvar_init_sets_the_initial_posterior_spread() -> None:
    torch.manual_seed(0)
    base = create_model("proseg", in_channels=1, num_raters=2, preset="tiny")
    torch.manual_seed(0)
    low = create_model("proseg", in_channels=1, num_raters=2, preset="tiny", z_logvar_init=-4.0)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        _, lv_base = base._stats(base._features(x), None)
        _, lv_low = low._stats(low._features(x), None)
    # same weights, the bias of the log-variance channels moved by -4 minus its default value
    assert lv_low.mean().item() < lv_base.mean().item() - 3.0
    assert torch.equal(low.stat_heads.biases[-1][:, :4], base.stat_heads.biases[-1][:, :4])  # mu untouched


# --- scale (space-to-depth), K training draws and the energy score -------------------------------------------------
@pytest.mark.parametrize("s", [2, 3])
def test_fold_and_unfold_are_exact_inverses_of_the_pixel_layout(s: int) -> None:
    model = tiny(scale=s, scale_head="shuffle")
    x = torch.randn(2, 1, 5 * s, 4 * s)
    folded = model._fold(x)  # (B, s^2, 5, 4): channel i*s + j holds pixel (h*s + i, w*s + j)
    assert folded.shape == (2, s * s, 5, 4)
    back = model._unfold(folded, (5 * s, 4 * s))  # the head's channel-first (..., s^2, h, w) layout
    torch.testing.assert_close(back[:, None], x, rtol=0, atol=0)


def test_smooth_scale_head_starts_as_upsampled_coarse_logits() -> None:
    model = tiny(scale=2, scale_head="smooth")
    assert model.head.outputs == 5 and float(model.head.last.weight[1:].detach().abs().sum()) == 0.0
    t = torch.randn(2, 5, 3, 4)  # (..., 1 + s^2, h, w) with zero corrections
    t[:, 1:] = 0.0
    up = F.interpolate(t[:, :1], scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(model._unfold(t, (5, 7)), up.reshape(2, 6, 8)[:, :5, :7])


@pytest.mark.parametrize("size", [(16, 16), (17, 15), (9, 12)])
def test_scale_two_trains_and_samples_at_full_resolution_for_any_size(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = create_model("proseg", in_channels=2, num_raters=3, preset="tiny", scale=2)
    g = torch.Generator().manual_seed(0)
    b = {"image": torch.randn(2, 2, *size, generator=g), "masks": (torch.rand(2, 3, *size, generator=g) > 0.5).float()}
    out = model.loss(b, torch.Generator().manual_seed(1))
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters()) and torch.isfinite(out["loss"])
    x = b["image"]
    assert model.sample_personalized(x, 2, g).shape == (2, 3, 2, *size)
    assert model.sample_diverse(x, 5, g).shape == (2, 5, *size)
    assert model.reconstruct(x, g).shape == (2, 3, 2, *size)
    assert model.sample_tau(x, model.interpolate(0, 1, 0.5), 3, g).shape == (2, 3, *size)


def test_scale_two_costs_a_quarter_of_the_latent() -> None:
    model = tiny(scale=2)
    mu, logvar = model._stats(model._features(torch.randn(1, 1, H, W)), None)
    assert mu.shape == (1, 3, H // 2, W // 2, model.z_channels) and logvar.shape == mu.shape


def test_train_samples_average_the_segmentation_loss_and_add_the_energy_score() -> None:
    model = tiny(train_samples=3, es_weight=0.5, presence=False)
    out = model.loss(batch(), torch.Generator().manual_seed(0))
    assert "es" in out and torch.isfinite(out["es"])
    expected = (out["seg"] + model.kl_weight * (out["kl_tau"] + out["kl_z"]) + model.ce_weight * out["ce"]
                + model.recon_weight * out["recon"] + model.l2_weight * out["l2"] + 0.5 * out["es"])
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert "es" not in tiny().loss(batch())  # off by default: the stored outputs' loss dicts are unchanged


def test_seg_on_mean_scores_the_posterior_mean_and_leaves_the_draws_to_the_energy_score() -> None:
    torch.manual_seed(0)
    model = tiny(train_samples=2, es_weight=0.5, seg_on="mean", presence=False)
    narrow = copy.deepcopy(model)  # the same weights, scoring its draws, with Z's spread made negligible
    narrow.seg_on = "sample"
    with torch.no_grad():
        narrow.stat_heads.biases[-1][:, narrow.z_channels:] = -40.0
    sampled = copy.deepcopy(narrow)
    sampled.stat_heads.load_state_dict(model.stat_heads.state_dict())  # scoring draws at the real spread
    outs = [m.loss(batch(), torch.Generator().manual_seed(3)) for m in (model, narrow, sampled)]
    torch.testing.assert_close(outs[0]["seg"], outs[1]["seg"], rtol=1e-5, atol=1e-6)  # the mean's seg loss
    assert not torch.allclose(outs[0]["seg"], outs[2]["seg"])  # not the draws'
    torch.testing.assert_close(outs[0]["es"], outs[2]["es"])  # the draws are scored by the energy score
    outs[0]["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_scale_and_energy_score_options_are_checked() -> None:
    bad = ({"scale": 0}, {"scale": 1.5}, {"scale_head": "nearest"}, {"train_samples": 0}, {"es_weight": 1.0},
           {"es_weight": -1.0, "train_samples": 2}, {"seg_on": "mean"}, {"seg_on": "mode", "train_samples": 2,
                                                                      "es_weight": 0.1})
    for kw in bad:
        with pytest.raises(ValueError):
            tiny(**kw)


def test_z_temperature_scales_only_the_sampling_spread() -> None:
    base = tiny()
    hot = tiny(z_temperature=3.0)
    cold = tiny(z_temperature=0.0)
    b = batch()
    torch.testing.assert_close(hot.loss(b, torch.Generator().manual_seed(0))["loss"],
                               base.loss(b, torch.Generator().manual_seed(0))["loss"])  # training unchanged
    x = b["image"]

    def spread(m: ProSeg) -> float:
        return float(m.sample_personalized(x, 8, torch.Generator().manual_seed(1)).var(dim=2).mean())

    assert spread(cold) < spread(base) < spread(hot)  # (tau ~ q(tau|r) still varies at temperature 0)
    with pytest.raises(ValueError):
        tiny(z_temperature=-1.0)


def test_personalized_z_temperature_changes_only_the_personalized_samples() -> None:
    """personalized_z_temperature=T draws the personalized samples of a z_temperature=T model and the diverse samples
    of the model without it (same weights, same generator seeds)."""
    base = tiny(presence=True, diverse_mode="per_rater").eval()
    cold = tiny(presence=True, diverse_mode="per_rater", z_temperature=0.0).eval()
    split = tiny(presence=True, diverse_mode="per_rater", personalized_z_temperature=0.0).eval()
    for m in (cold, split):
        m.load_state_dict(base.state_dict())
    x = batch()["image"]

    def draw(m: ProSeg, mode: str) -> torch.Tensor:
        with torch.no_grad():
            return getattr(m, f"sample_{mode}")(x, 6, torch.Generator().manual_seed(3))

    torch.testing.assert_close(draw(split, "personalized"), draw(cold, "personalized"), rtol=0, atol=0)
    torch.testing.assert_close(draw(split, "diverse"), draw(base, "diverse"), rtol=0, atol=0)
    assert not torch.equal(draw(split, "personalized"), draw(base, "personalized"))
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="personalized_z_temperature"):
            tiny(personalized_z_temperature=bad)


def test_mask_posterior_starts_at_the_prior_and_sampling_ignores_it() -> None:
    """z_posterior="mask": q(Z|x,r,y) starts equal to p(Z|x,r) (KL 0, the same draws and terms as "rater"), the KL
    term is KL(q || p) once q moved, every parameter gets a gradient, and sampling uses p alone."""
    b = batch()
    plain, cvae = tiny(presence=True), tiny(presence=True, z_posterior="mask")
    shared = {k: v for k, v in cvae.state_dict().items() if not k.startswith("posterior.")}
    plain.load_state_dict(shared)
    lp, lc = plain.loss(b, torch.Generator().manual_seed(0)), cvae.loss(b, torch.Generator().manual_seed(0))
    assert float(lc["kl_z"].detach()) == 0.0 and float(lp["kl_z"].detach()) > 0
    for key in ("seg", "kl_tau", "ce", "recon", "presence"):
        torch.testing.assert_close(lc[key], lp[key], rtol=0, atol=0)
    lc["loss"].backward()
    assert all(p.grad is not None for p in cvae.parameters())
    last = cvae.posterior.net[-1]
    assert float(last.weight.grad.abs().sum()) > 0  # the posterior's output layer learns from the mask
    with torch.no_grad():  # move q away from p: the KL term is then positive
        last.bias.fill_(0.5)
    assert float(cvae.loss(b, torch.Generator().manual_seed(0))["kl_z"].detach()) > 0
    x = b["image"]
    # the same weights and batch-norm statistics (each loss call in train mode moved cvae's)
    plain.load_state_dict({k: v for k, v in cvae.state_dict().items() if not k.startswith("posterior.")})
    for mode in ("personalized", "diverse"):
        with torch.no_grad():
            got = getattr(cvae.eval(), f"sample_{mode}")(x, 4, torch.Generator().manual_seed(2))
            want = getattr(plain.eval(), f"sample_{mode}")(x, 4, torch.Generator().manual_seed(2))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="z_posterior"):
        tiny(z_posterior="image")


@pytest.mark.parametrize("generation", ["first", "second"])
def test_checkpoints_of_the_former_defaults_still_load(tmp_path, generation: str) -> None:
    """model.json files of the first sessions named only the call (name, C, R, preset); the first generation's
    default was full resolution without presence, the second's half resolution (its files also pin scale,
    scale_head, diverse_mode, z_noise_scale) without presence; both drew Z's noise pixel by pixel."""
    import json

    from proseg.errors import ProsegWarning
    from proseg.models import load_model, save_model

    torch.manual_seed(0)
    if generation == "first":
        old = create_model("proseg", in_channels=1, num_raters=2, scale=1, diverse_mode="prior_classifier",
                           presence=False, z_noise_scale=1)
        pinned: dict = {}
    else:
        old = create_model("proseg", in_channels=1, num_raters=2, presence=False, z_noise_scale=1)
        pinned = {"scale": 2, "scale_head": "smooth", "diverse_mode": "per_rater", "z_noise_scale": 1}
    save_model(old, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    assert meta["model"]["presence"] is False and meta["model"]["z_channels"] == 16  # new files pin everything
    meta["model"] = {"name": "proseg", "in_channels": 1, "num_raters": 2, "preset": "default", **pinned}
    (tmp_path / "ckpt" / "model.json").write_text(json.dumps(meta))  # what an old file looks like
    with pytest.warns(ProsegWarning, match="former defaults"):
        back = load_model(tmp_path / "ckpt")
    assert back.presence is False and back.scale == old.scale and back.diverse_mode == old.diverse_mode
    assert back.z_noise_scale == 1
    x = torch.randn(1, 1, H, W)
    torch.testing.assert_close(back.sample_diverse(x, 3, torch.Generator().manual_seed(0)),
                               old.sample_diverse(x, 3, torch.Generator().manual_seed(0)))
    save_model(back, tmp_path / "again")  # re-saved, it records the former values and loads without a warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model(tmp_path / "again").presence is False


@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
def test_z_noise_scale_shares_each_draw_over_a_block_and_keeps_the_marginal(size: tuple[int, int]) -> None:
    model = create_model("proseg", in_channels=1, num_raters=2, z_noise_scale=2)
    h, w = size
    mu, std = torch.zeros(4000, h, w, 3), torch.ones(4000, h, w, 3)
    z = model._draw_z(mu, std, torch.Generator().manual_seed(0))
    assert z.shape == (4000, h, w, 3)
    blocks = z[:, : h - h % 2, : w - w % 2].reshape(4000, h // 2, 2, w // 2, 2, 3)
    assert torch.equal(blocks[:, :, 0, :, 0], blocks[:, :, 1, :, 1])  # one draw per 2x2 block
    assert torch.equal(blocks[:, :, 0, :, 0], blocks[:, :, 0, :, 1])
    assert not torch.equal(z[:, 0, 0], z[:, 0, 2])  # neighbouring blocks differ
    assert abs(float(z.mean())) < 0.02 and abs(float(z.var()) - 1.0) < 0.03  # every pixel still N(mu, std^2)
    with pytest.raises(ValueError, match="z_noise_scale"):
        create_model("proseg", in_channels=1, num_raters=2, z_noise_scale=0)


def test_z_noise_scale_trains_and_samples_with_fewer_normals() -> None:
    model = create_model("proseg", in_channels=1, num_raters=3, z_noise_scale=2)
    batch = {"image": torch.randn(2, 1, 20, 20), "masks": (torch.rand(2, 3, 20, 20) > 0.5).float(),
             "present": torch.ones(2, 3, dtype=torch.bool)}
    out = model.loss(batch, torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    model.eval()
    with torch.no_grad():
        d = model.sample_diverse(batch["image"], 4, torch.Generator().manual_seed(1))
        p = model.sample_personalized(batch["image"], 2, torch.Generator().manual_seed(1))
    assert d.shape == (2, 4, 20, 20) and p.shape == (2, 3, 2, 20, 20)
    assert model._noise_shape((1, 10, 10, 16)) == (1, 5, 5, 16)


# --- presence: whether a rater drew anything ----------------------------------------------------------------------
def _presence_batch() -> dict:
    g = torch.Generator().manual_seed(2)
    masks = torch.zeros(3, 3, H, W)
    masks[:, :, 4:10, 4:10] = 1.0
    masks[0, 1] = 0.0  # image 0: rater 1 left it empty
    masks[1, :2] = 0.0  # image 1: raters 0 and 1 left it empty
    masks[2] = 0.0  # image 2: nobody drew
    return {"image": torch.randn(3, 1, H, W, generator=g), "masks": masks,
            "rater_present": torch.tensor([[True, True, True], [True, True, True], [True, False, True]])}


def test_presence_loss_is_the_bce_of_every_present_rater_and_every_parameter_learns() -> None:
    model = tiny(presence=True)
    b = _presence_batch()
    out = model.loss(b, torch.Generator().manual_seed(0))
    drew = b["masks"].flatten(2).amax(-1) > 0
    pix, logits = model.presence_head(model._features(b["image"]))
    assert torch.equal(logits, pix.flatten(2).amax(-1) * model.presence_head.scale + model.presence_head.shift)
    bce = F.binary_cross_entropy_with_logits(logits, drew.float(), reduction="none")
    bce = bce + F.binary_cross_entropy_with_logits(pix, b["masks"], reduction="none").mean(dim=(2, 3))  # scale 1
    expected = bce[b["rater_present"]].mean()  # the absent rater (image 2, rater 1) does not count
    torch.testing.assert_close(out["presence"], expected)
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert "presence" not in tiny(presence=False).loss(b, torch.Generator().manual_seed(0))


def test_presence_trains_the_segmentation_path_only_on_masks_that_are_not_empty() -> None:
    """With presence the pairs of empty masks weigh nothing in the segmentation, Z and reconstruction terms: the
    same as declaring those raters absent (rater_sampling="all" uses every pair, so the draws line up)."""
    model = tiny(presence=True, rater_sampling="all")
    b = _presence_batch()
    drew = b["masks"].flatten(2).amax(-1) > 0
    out = model.loss(b, torch.Generator().manual_seed(0))
    ref = model.loss({**b, "rater_present": b["rater_present"] & drew}, torch.Generator().manual_seed(0))
    for key in ("seg", "kl_z", "kl_tau", "ce", "recon"):
        torch.testing.assert_close(out[key], ref[key])
    # "one": image 0 draws rater 0 or 2 (both drew), image 1 rater 2, image 2 nothing
    one = tiny(presence=True)
    batch_2 = {**b, "image": b["image"][1:2], "masks": b["masks"][1:2], "rater_present": b["rater_present"][1:2]}
    only = {**batch_2, "rater_present": torch.tensor([[False, False, True]])}
    for seed in range(8):
        torch.testing.assert_close(one.loss(batch_2, torch.Generator().manual_seed(seed))["seg"],
                                   one.loss(only, torch.Generator().manual_seed(seed))["seg"])


def _set_presence(model: ProSeg, logits: list[float]) -> None:
    with torch.no_grad():
        model.presence_head.scale.zero_()
        model.presence_head.shift.copy_(torch.tensor(logits))


@pytest.mark.parametrize("mode", ["per_rater", "prior_classifier"])
def test_presence_draws_empty_samples_at_the_predicted_rate(mode: str) -> None:
    model = tiny(presence=True, diverse_mode=mode, z_logvar_init=-4.0).eval()
    with torch.no_grad():  # a head that always draws a blob, so that only the gate can empty a sample
        model.head.last.bias.fill_(20.0)
    _set_presence(model, [30.0, -30.0, 0.0])  # pi = 1, 0, 1/2
    x = torch.randn(2, 1, H, W)
    p = model.sample_personalized(x, 400, torch.Generator().manual_seed(0))  # (B, R, K, H, W)
    empty = p.flatten(3).amax(-1) == 0
    assert bool((p.flatten(3).amax(-1)[~empty] > 0.5).all())  # a present sample is the head's own draw
    assert not bool(empty[:, 0].any()) and bool(empty[:, 1].all())
    assert abs(float(empty[:, 2].float().mean()) - 0.5) < 0.06
    d = model.sample_diverse(x, 600, torch.Generator().manual_seed(1))
    frac = float((d.flatten(2).amax(-1) == 0).float().mean())
    if mode == "per_rater":  # 200 samples of each rater: 0 + 200 + ~100 empty
        assert abs(frac - 0.5) < 0.05
    else:  # the classifier's raters, emptied at their own rate: none when every pi is 1, all when every pi is 0
        _set_presence(model, [30.0, 30.0, 30.0])
        assert float((model.sample_diverse(x, 50, torch.Generator().manual_seed(1)).flatten(2).amax(-1) == 0)
                     .float().mean()) == 0.0
        _set_presence(model, [-30.0, -30.0, -30.0])
        assert float(model.sample_diverse(x, 5, torch.Generator().manual_seed(1)).abs().max()) == 0.0
    # share_latent: one presence draw per sample for the whole batch
    same = x[:1].expand(3, -1, -1, -1)
    _set_presence(model, [0.0, 0.0, 0.0])
    s = model.sample_personalized(same, 20, torch.Generator().manual_seed(2), share_latent=True)
    e = s.flatten(3).amax(-1) == 0
    assert torch.equal(e[0], e[1]) and torch.equal(e[0], e[2]) and 0 < int(e.sum()) < e.numel()
    t = model.sample_tau(x, torch.ones(model.tau_dim), 50, torch.Generator().manual_seed(3), rater=1)  # pi 1/2
    assert 0 < int((t.flatten(2).amax(-1) == 0).sum()) < 100


def test_presence_is_saved_grows_with_new_raters_and_follows_a_rater_subset(tmp_path) -> None:
    import json

    from proseg.models import load_model, save_model

    model = tiny(presence=True).eval()
    save_model(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "model.json").read_text())["model"]["presence"] is True
    back = load_model(tmp_path / "ckpt")
    x = torch.randn(2, 1, H, W)
    torch.testing.assert_close(back.sample_personalized(x, 3, torch.Generator().manual_seed(0)),
                               model.sample_personalized(x, 3, torch.Generator().manual_seed(0)))
    _set_presence(model, [30.0, -30.0, 30.0])
    sub = model.sample_personalized(x, 4, torch.Generator().manual_seed(0), raters=[1, 2])
    assert float(sub[:, 0].abs().max()) == 0.0 and bool((sub[:, 1].flatten(2).amax(-1) > 0).all())
    model.add_rater()
    assert model.presence_head.pixel.weight.shape[0] == 4 and model.presence_head.shift.shape == (4,)
    assert model.sample_personalized(x, 2, torch.Generator().manual_seed(0)).shape == (2, 4, 2, H, W)
    assert {"presence_head.pixel.weight", "presence_head.shift"} <= {n for n, _, _ in model.rater_tensors()}


@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
def test_presence_pixel_targets_are_the_masks_at_the_latent_resolution(size: tuple[int, int]) -> None:
    model = create_model("proseg", in_channels=1, num_raters=2, presence=True)  # scale 2
    masks = torch.zeros(1, 2, *size)
    masks[0, 0, 3, 5] = 1.0
    masks[0, 1, size[0] - 1, size[1] - 1] = 1.0  # the last pixel: its latent pixel is a padded one for odd sizes
    marks = model._latent_marks(masks)
    h, w = -(-size[0] // 2), -(-size[1] // 2)
    assert marks.shape == (1, 2, h, w)
    assert marks[0, 0].nonzero().tolist() == [[1, 2]]
    assert marks[0, 1].nonzero().tolist() == [[h - 1, w - 1]]


def test_presence_temperature_sharpens_the_presence_draw() -> None:
    x = torch.randn(2, 1, H, W)
    rates = {}
    for t in (1.0, 0.25, 0.0):
        model = tiny(presence=True, presence_temperature=t).eval()
        with torch.no_grad():
            model.head.last.bias.fill_(20.0)
        _set_presence(model, [0.5, -0.5, 3.0])  # pi = 0.62, 0.38, 0.95 at T = 1
        p = model.sample_personalized(x, 400, torch.Generator().manual_seed(0))
        rates[t] = (p.flatten(3).amax(-1) == 0).float().mean((0, 2))  # empty rate per rater
    assert abs(float(rates[1.0][0]) - (1 - torch.sigmoid(torch.tensor(0.5)).item())) < 0.06
    assert float(rates[0.25][0]) < float(rates[1.0][0]) and float(rates[0.25][1]) > float(rates[1.0][1])
    assert rates[0.0].tolist() == [0.0, 1.0, 0.0]  # T = 0: present exactly where pi > 1/2
    with pytest.raises(ValueError, match="presence_temperature"):
        tiny(presence_temperature=-1.0)


def test_presence_bias_shifts_the_logit_before_the_temperature() -> None:
    x = torch.randn(2, 1, H, W)
    model = tiny(presence=True, presence_temperature=0.0, presence_bias=-1.0).eval()
    with torch.no_grad():
        model.head.last.bias.fill_(20.0)
    _set_presence(model, [0.5, 1.5, -0.5])  # with b = -1 at T = 0: absent, present, absent
    p = model.sample_personalized(x, 8, torch.Generator().manual_seed(0))
    assert (p.flatten(3).amax(-1) == 0).float().mean((0, 2)).tolist() == [1.0, 0.0, 1.0]
    model.presence_temperature, model.presence_bias = 1.0, -0.5  # pi = sigmoid(0) = 1/2 for rater 0
    e = model.sample_personalized(x, 600, torch.Generator().manual_seed(1)).flatten(3).amax(-1) == 0
    assert abs(float(e[:, 0].float().mean()) - 0.5) < 0.05
    with pytest.raises(ValueError, match="presence_bias"):
        tiny(presence_bias=float("nan"))


@pytest.mark.parametrize("mode", ["per_rater", "prior_classifier"])
@pytest.mark.parametrize("share", [False, True])
def test_absent_samples_are_skipped_and_the_kept_samples_do_not_change(mode: str, share: bool, monkeypatch) -> None:
    """A (rater, sample) that no image keeps draws no noise and runs no head: the kept samples are exactly the ones
    drawn when every sample is kept, and the absent ones are the empty mask."""
    model = tiny(presence=True, diverse_mode=mode).eval()
    x = torch.randn(3, 1, H, W)
    R, K = model.num_raters, 7
    rates = torch.tensor([0.3, 0.7, 0.5])
    full_gate = model._presence_gate

    def gate_with(keep_all: bool):
        def fn(feats, raters, shape, generator):
            g = full_gate(feats, raters, shape, generator)  # the same generator draws as the real gate
            if keep_all:
                return torch.ones_like(g)
            u = torch.rand(g.shape, generator=torch.Generator().manual_seed(9))
            return (u < (rates[: g.shape[1], None] if g.shape[1] == R else 0.5)).to(g.dtype)
        return fn

    heads = []
    real_logits = model._logits
    monkeypatch.setattr(model, "_logits", lambda z, tau, size: heads.append(z.shape[1]) or real_logits(z, tau, size))
    outs = {}
    for keep_all in (True, False):
        monkeypatch.setattr(model, "_presence_gate", gate_with(keep_all))
        heads.clear()
        outs[keep_all] = (model.sample_personalized(x, K, torch.Generator().manual_seed(0), share_latent=share),
                          model.sample_diverse(x, K, torch.Generator().manual_seed(1), share_latent=share))
        runs = sum(heads)
        if keep_all:
            all_runs = runs
    assert runs < all_runs  # some samples were skipped
    for full, gated in zip(outs[True], outs[False], strict=True):
        kept = gated.flatten(-2).amax(-1) > 0
        assert bool(kept.any()) and not bool(kept.all())
        torch.testing.assert_close(gated[kept], full[kept], rtol=0, atol=0)
    g = gate_with(False)(model._features(x), None, (1, R, K), None)
    assert torch.equal(outs[False][0].flatten(-2).amax(-1) > 0, (g > 0).expand(3, R, K))


def test_the_presence_path_uses_each_raters_own_statistics() -> None:
    """With Z at its mean (z_temperature=0) a sample is the head on (mu_r, tau): the presence path, which splits its
    runs of samples at rater boundaries, must give exactly what the plain broadcast path gives."""
    model = tiny(presence=True, diverse_mode="per_rater", z_temperature=0.0).eval()
    _set_presence(model, [30.0, 30.0, 30.0])  # every sample drawn
    x = torch.randn(2, 1, H, W)
    with torch.no_grad():
        gated = model.sample_personalized(x, 5, torch.Generator().manual_seed(0))
        head, model.presence_head = model.presence_head, None
        plain = model.sample_personalized(x, 5, torch.Generator().manual_seed(0))
        model.presence_head = head
    torch.testing.assert_close(gated, plain, rtol=0, atol=0)
