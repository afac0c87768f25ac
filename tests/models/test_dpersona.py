"""D-Persona: the bound loss on hand-made masks, the stage hand-over, the projection read-out, sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from proseg.models import NotSupportedError, create_model, load_model, save_model
from proseg.models.base import WEIGHTS_NAME
from proseg.models.dpersona import DPersona, bound_loss

H = W = 16


def _batch(b: int = 2, r: int = 3, c: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(b, c, H, W, generator=g),
        "masks": (torch.rand(b, r, H, W, generator=g) > 0.6).float(),
        "rater_present": torch.ones(b, r, dtype=torch.bool),
    }


def _masks() -> torch.Tensor:
    """One image, 3 raters on a 4x4 grid: nested squares, so the union is rater 2's and the intersection
    rater 0's."""
    m = torch.zeros(1, 3, 4, 4)
    m[0, 0, 1:2, 1:2] = 1  # 1 pixel
    m[0, 1, 1:3, 1:3] = 1  # 4 pixels
    m[0, 2, 0:3, 0:3] = 1  # 9 pixels
    return m


def test_bound_loss_is_zero_when_the_sample_envelope_is_the_rater_envelope() -> None:
    masks = _masks()
    samples = masks.clone()  # the samples are the raters' masks: max = union, min = intersection
    assert float(bound_loss(samples, masks)) == pytest.approx(0.0, abs=1e-6)
    # two samples equal to the union and the intersection themselves
    env = torch.stack([masks[0, 2], masks[0, 0]])[None]
    assert float(bound_loss(env, masks)) == pytest.approx(0.0, abs=1e-6)


def test_bound_loss_hand_computed_and_over_present_raters_only() -> None:
    masks = _masks()
    # max of the samples covers 4 of the 9 union pixels and nothing else: Dice 2*4/(4+9) = 8/13;
    # the min equals the intersection: Dice 1. Loss = mean(1 - 8/13, 0) = 5/26.
    samples = torch.stack([masks[0, 1], masks[0, 0]])[None]
    assert float(bound_loss(samples, masks)) == pytest.approx(5 / 26, abs=1e-6)
    # rater 2 absent: the union is rater 1's square, which the samples now match exactly
    present = torch.tensor([[True, True, False]])
    assert float(bound_loss(samples, masks, present)) == pytest.approx(0.0, abs=1e-6)
    # rater 0 absent: the intersection is rater 1's square (4 px); the min (1 px) scores 2*1/(1+4)
    present = torch.tensor([[False, True, True]])
    assert float(bound_loss(samples, masks, present)) == pytest.approx(0.5 * (1 - 8 / 13) + 0.5 * (1 - 0.4))
    # an image without any present rater contributes nothing
    two = torch.cat([masks, torch.ones_like(masks)])
    pres = torch.tensor([[True, True, True], [False, False, False]])
    assert float(bound_loss(torch.cat([samples, torch.zeros_like(samples)]), two, pres)) == pytest.approx(5 / 26)


def test_stage1_trains_everything_but_the_heads() -> None:
    model = create_model("dpersona", in_channels=1, num_raters=3, preset="tiny")
    assert model.stage == 1 and not model.supports_personalized and not DPersona.supports_personalized
    out = model.loss(_batch(), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "seg", "kl", "bound", "reg"}
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith("proj_heads.")), name
        assert (p.grad is not None) == p.requires_grad, name
    assert int(model.trained_stage) == 1
    with pytest.raises(NotSupportedError, match="stage-2"):
        model.sample_personalized(torch.randn(1, 1, H, W))


def test_stage_hand_over_strict_load_and_frozen_stage1(tmp_path: Path) -> None:
    stage1 = create_model("dpersona", in_channels=1, num_raters=3, preset="tiny")
    stage1.loss(_batch(), generator=torch.Generator().manual_seed(0))["loss"].backward()
    save_model(stage1, tmp_path / "s1")

    # (a) a stage-2 model built from the config, stage-1 weights loaded strictly (the trainer's init_from)
    model = create_model("dpersona", in_channels=1, num_raters=3, preset="tiny", stage=2)
    model.load_state_dict(load_file(str(tmp_path / "s1" / WEIGHTS_NAME)), strict=True)
    assert model.stage == 2 and model.supports_personalized
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("proj_heads.") for n in trainable)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("proj_heads.")}
    frozen.pop("trained_stage")
    opt = torch.optim.SGD(model.param_groups(lr=0.1))
    model.train()
    assert not model.backbone.training and model.proj_heads.training  # frozen BatchNorm statistics
    out = model.loss(_batch(seed=1), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "seg"}
    out["loss"].backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    opt.step()
    after = model.state_dict()
    for k, v in frozen.items():
        torch.testing.assert_close(after[k], v, msg=k)  # weights and BatchNorm buffers untouched
    assert int(model.trained_stage) == 2

    # (b) load_model + set_stage(2): the stage goes into the saved config and round-trips
    model2 = load_model(tmp_path / "s1")
    assert model2.stage == 1 and not model2.supports_personalized
    model2.set_stage(2)
    assert model2.init_config["stage"] == 2
    save_model(model2, tmp_path / "s2")
    model3 = load_model(tmp_path / "s2")
    assert isinstance(model3, DPersona) and model3.stage == 2 and model3.supports_personalized


def test_stage_is_an_explicit_option_and_the_flag_a_plain_attribute() -> None:
    model = create_model("dpersona", in_channels=1, num_raters=3, preset="tiny")
    built = model.init_config
    assert built["stage"] == 1 and model.stage == 1
    assert vars(model)["supports_personalized"] is False and DPersona.supports_personalized is False
    model.set_stage(2)
    assert model.init_config["stage"] == 2 and built["stage"] == 1  # derived from the stage, nothing mutated
    assert model.supports_personalized is True
    model.loss(_batch(), generator=torch.Generator().manual_seed(0))  # training mode: trained_stage = 2
    model.set_stage(1)
    assert model.init_config["stage"] == 1 and model.supports_personalized  # its heads have been trained
    fresh = create_model("dpersona", in_channels=1, num_raters=3, preset="tiny")
    assert not fresh.supports_personalized
    fresh.load_state_dict(model.state_dict())  # trained_stage 2 comes with the weights
    assert fresh.stage == 1 and fresh.supports_personalized
    assert create_model(**fresh.init_config).stage == 1


def test_projection_reads_out_the_set_and_averages_logits() -> None:
    model = create_model("dpersona", in_channels=1, num_raters=2, preset="tiny", stage=2, num_queries=3).eval()
    img = torch.randn(2, 1, H, W)
    with torch.no_grad():
        feats = model.backbone(img)
        z0 = torch.randn(2, 1, 1, model.latent_dim)
        z_set = z0.expand(2, 1, 5, model.latent_dim)  # a set of identical latents: attention returns z0
        out = model._project(feats, z_set)
        ref = model.fcomb(feats, z0[:, 0])  # (B, 1, H, W)
    assert out.shape == (2, 2, 1, H, W)
    torch.testing.assert_close(out[:, 0], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 1], ref, rtol=1e-5, atol=1e-5)


def test_personalized_sampling_and_stage2_masking() -> None:
    model = create_model("dpersona", in_channels=3, num_raters=4, preset="tiny", stage=2).eval()
    img = torch.randn(1, 3, H, W).expand(2, 3, H, W).contiguous()
    with torch.no_grad():
        a = model.sample_personalized(img, 3, torch.Generator().manual_seed(4))
        b = model.sample_personalized(img, 3, torch.Generator().manual_seed(4))
        shared = model.sample_personalized(img, 3, torch.Generator().manual_seed(4), share_latent=True)
        div = model.sample_diverse(img, 5, torch.Generator().manual_seed(4))
    assert a.shape == (2, 4, 3, H, W) and div.shape == (2, 5, H, W)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(shared[0], shared[1])
    assert not torch.allclose(a[0], a[1])

    batch = _batch(c=3, r=4)
    batch["rater_present"][0, 2] = False
    changed = dict(batch, masks=batch["masks"].clone())
    changed["masks"][0, 2] = 1.0 - changed["masks"][0, 2]
    for kind in ("channel_dice", "gdl"):
        model.stage2_loss = kind
        la = model.loss(batch, generator=torch.Generator().manual_seed(2))["loss"]
        lb = model.loss(changed, generator=torch.Generator().manual_seed(2))["loss"]
        torch.testing.assert_close(la, lb)


def test_stage1_absent_raters_and_bad_arguments() -> None:
    model = create_model("dpersona", in_channels=1, num_raters=3, preset="tiny").eval()
    batch = _batch()
    batch["rater_present"] = torch.tensor([[True, False, True], [False, True, True]])
    changed = dict(batch, masks=batch["masks"].clone())
    changed["masks"][0, 1] = 1.0 - changed["masks"][0, 1]
    changed["masks"][1, 0] = 1.0
    a = model.loss(batch, generator=torch.Generator().manual_seed(1))
    b = model.loss(changed, generator=torch.Generator().manual_seed(1))
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    with pytest.raises(ValueError, match="stages 1 and 2"):
        model.set_stage(3)
    with pytest.raises(ValueError, match="posterior_input"):
        create_model("dpersona", preset="tiny", posterior_input="none")
