"""Model-level adaptation API: add_rater, rater_parameters / freeze_except_rater, the tau-space helpers."""

from __future__ import annotations

import copy

import pytest
import torch

from proseg.models import create_model, load_model, save_model
from proseg.models.base import NotSupportedError


def _batch(x: torch.Tensor, r: int, new: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    present = torch.zeros(x.shape[0], r, dtype=torch.bool)
    present[:, new] = True
    return {"image": x, "masks": (torch.rand(x.shape[0], r, *x.shape[2:], generator=g) > 0.5).float(),
            "rater_present": present}


def _adapt(model, new: int, x: torch.Tensor, steps: int = 3) -> None:
    freeze = model.freeze_except_rater(new)
    opt = torch.optim.Adam(freeze.params, lr=1e-2)
    model.eval()
    for s in range(steps):
        loss = model.loss(_batch(x, model.num_raters, new), torch.Generator().manual_seed(s))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    freeze.remove()


@pytest.mark.parametrize("init", ["mean", "prior", 1])
def test_proseg_adaptation_keeps_old_raters_bitwise(init, tmp_path) -> None:
    torch.manual_seed(0)
    m = create_model("proseg", in_channels=1, num_raters=3, preset="tiny")
    x = torch.randn(2, 1, 16, 16)
    before = m.sample_personalized(x, 3, generator=torch.Generator().manual_seed(0))
    orig = copy.deepcopy(m.state_dict())
    new = m.add_rater(init)
    assert new == 3 and m.num_raters == 4 and m.init_config["num_raters"] == 4
    names = [n for n, _ in m.rater_parameters(new)]
    assert "tau.raw_concentration" in names and any(n.startswith("stat_heads") for n in names)
    start = m.tau.raw_concentration.detach()[new].clone()
    _adapt(m, new, x)
    assert not torch.equal(m.tau.raw_concentration.detach()[new], start)  # the new rater was fitted
    after = m.sample_personalized(x, 3, generator=torch.Generator().manual_seed(0), raters=range(3))
    assert torch.equal(before, after)
    sd = m.state_dict()
    for k, v in orig.items():
        assert torch.equal(sd[k] if sd[k].shape == v.shape else sd[k][:3], v), k
    assert all(p.requires_grad for p in m.parameters())  # remove() restored the flags
    save_model(m, tmp_path)
    m2 = load_model(tmp_path)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(m2.sample_personalized(x, 2, generator=g), m.sample_personalized(
        x, 2, generator=torch.Generator().manual_seed(3)))


def test_proseg_tau_space() -> None:
    m = create_model("proseg", in_channels=1, num_raters=3, preset="tiny")
    x = torch.randn(2, 1, 16, 16)
    pos = m.tau_positions()
    assert pos["mean"].shape == (3, m.tau_dim) and torch.allclose(pos["mean"].sum(-1), torch.ones(3))
    mid = m.interpolate(0, 1, 0.5)
    assert torch.allclose(mid, (pos["concentration"][0] + pos["concentration"][1]) / 2)
    y = m.sample_tau(x, mid, 4, torch.Generator().manual_seed(0))
    assert y.shape == (2, 4, 16, 16) and bool(((y >= 0) & (y <= 1)).all())
    z = m.sample_tau(x, torch.full((3, m.tau_dim), 1.0 / m.tau_dim), rater=2)
    assert z.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError):
        m.sample_tau(x, torch.ones(m.tau_dim + 1))
    with pytest.raises(ValueError):
        m.interpolate(0, 7, 0.5)


@pytest.mark.parametrize("name", ["pionono", "cm_global"])
def test_other_models_add_rater(name, tmp_path) -> None:
    m = create_model(name, in_channels=1, num_raters=3, preset="tiny")
    x = torch.randn(2, 1, 16, 16)
    before = m.sample_personalized(x, 2, generator=torch.Generator().manual_seed(0))
    orig = copy.deepcopy(m.state_dict())
    new = m.add_rater("prior")
    _adapt(m, new, x)
    sd = m.state_dict()
    for k, v in orig.items():
        assert torch.equal(sd[k] if sd[k].shape == v.shape else sd[k][:3], v), k
    assert m.sample_personalized(x, 1).shape[1] == 4 and before.shape[1] == 3
    save_model(m, tmp_path)
    assert load_model(tmp_path).num_raters == 4


def test_add_rater_errors() -> None:
    m = create_model("proseg", in_channels=1, num_raters=3, preset="tiny")
    with pytest.raises(ValueError):
        m.add_rater(5)
    with pytest.raises(ValueError):
        m.add_rater("median")
    with pytest.raises(NotSupportedError):
        create_model("prob_unet", in_channels=1, num_raters=3, preset="tiny").add_rater()
