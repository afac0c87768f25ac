"""Shared base tester: every registered model (``list_models()``) with its ``tiny`` preset, on CPU, tiny inputs.

The pattern of segmentation_models_pytorch ``tests/models/base.py``: the same checks for every architecture.
Which sampling calls a model supports is read from the *instance* flags ``supports_personalized`` /
``supports_diverse`` (a model may decide per instance, e.g. D-Persona by stage); an unsupported call must raise
``NotSupportedError``.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from proseg.errors import ConfigError
from proseg.models import (
    MultiRaterModel,
    NotSupportedError,
    create_model,
    get_model_class,
    list_models,
    load_model,
    save_model,
)

MODELS = list_models()
H = W = 16
B = 2


def make_model(name: str, in_channels: int = 1, num_raters: int = 3, seed: int = 0) -> MultiRaterModel:
    torch.manual_seed(seed)
    model = create_model(name, in_channels=in_channels, num_raters=num_raters, preset="tiny")
    assert isinstance(model, MultiRaterModel)
    return model


def make_batch(in_channels: int, num_raters: int, seed: int = 0, present: torch.Tensor | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, in_channels, H, W, generator=g)
    # blob-like masks so that every rater has some foreground and some background
    masks = (torch.rand(B, num_raters, H, W, generator=g) > 0.5).float()
    masks[..., 4:10, 4:10] = 1.0
    masks[..., :2, :] = 0.0
    if present is None:
        present = torch.ones(B, num_raters, dtype=torch.bool)
    return {"image": image, "masks": masks, "rater_present": present}


def test_registry_has_the_issue_models() -> None:
    assert "proseg" in MODELS
    for name in MODELS:
        cls = type(make_model(name))
        assert {"default", "tiny"} <= set(cls.PRESETS), f"{name}: presets {sorted(cls.PRESETS)}"


def _options(model: MultiRaterModel) -> dict:
    """The model's plain configuration attributes (rater_sampling, loss weights, flags ...)."""
    plain = (bool, int, float, str, tuple, type(None))
    return {k: v for k, v in vars(model).items() if not k.startswith("_") and isinstance(v, plain)}


@pytest.mark.parametrize("name", MODELS)
def test_constructor_defaults_are_the_default_preset(name: str) -> None:
    """smp's rule: ``Cls(C, R)`` is the recommended model, the one ``create_model(name, ...)`` builds."""
    cls = get_model_class(name)
    assert cls.PRESETS["default"] == {}, f"{name}: the default preset must be the constructor's defaults"
    C, R = 1, 3
    torch.manual_seed(0)
    direct = cls(C, R)
    torch.manual_seed(0)
    built = create_model(name, in_channels=C, num_raters=R)
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if k not in ("self", "in_channels", "num_raters")}
    # every constructor argument is recorded, so that a later change of a default cannot rebuild it differently
    assert built.init_config == {"name": name, "in_channels": C, "num_raters": R, "preset": "default",
                                 **defaults, **built.config_updates()}
    assert _options(direct) == _options(built)
    sd_a, sd_b = direct.state_dict(), built.state_dict()
    assert [(k, v.shape) for k, v in sd_a.items()] == [(k, v.shape) for k, v in sd_b.items()]
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a), f"{name}: equally seeded builds differ"
    with pytest.raises(AttributeError):  # no record of the arguments: save_model refuses rather than guess
        direct.init_config  # noqa: B018


@pytest.mark.parametrize("name", MODELS)
def test_an_unknown_loss_name_fails_at_construction(name: str) -> None:
    options = [k for k in ("seg_loss", "stage2_loss") if k in inspect.signature(get_model_class(name)).parameters]
    for key in options:
        with pytest.raises(ConfigError, match=f"unknown {key} 'dice'; segmentation losses: bce, gdl"):
            create_model(name, preset="tiny", **{key: "dice"})


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_raters,in_channels", [(1, 1), (2, 3), (4, 1), (7, 3), (1, 3), (2, 1), (4, 3), (7, 1)])
def test_forward_backward_every_parameter_gets_a_gradient(name: str, num_raters: int, in_channels: int) -> None:
    model = make_model(name, in_channels, num_raters)
    model.train()
    out = model.loss(make_batch(in_channels, num_raters))
    assert "loss" in out and out["loss"].ndim == 0
    for key, value in out.items():
        assert torch.is_tensor(value) and value.numel() == 1, f"{name}: term {key!r} is not a scalar tensor"
        assert torch.isfinite(value).all(), f"{name}: term {key!r} = {value}"
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"{name}: parameters without gradient: {no_grad[:8]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradients: {bad[:8]}"


def _call(model: MultiRaterModel, which: str, images: torch.Tensor, k: int, seed: int, share: bool = False):
    g = torch.Generator().manual_seed(seed)
    fn = model.sample_personalized if which == "personalized" else model.sample_diverse
    with torch.no_grad():
        return fn(images, num_samples=k, generator=g, share_latent=share)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("which", ["personalized", "diverse"])
def test_sampling_shapes_ranges_and_determinism(name: str, which: str) -> None:
    R, C, K = 3, 1, 4
    model = make_model(name, C, R).eval()
    images = make_batch(C, R)["image"]
    supported = bool(getattr(model, f"supports_{which}"))
    if not supported:
        with pytest.raises(NotSupportedError):
            _call(model, which, images, K, 0)
        return
    out = _call(model, which, images, K, 0)
    expected = (B, R, K, H, W) if which == "personalized" else (B, K, H, W)
    assert tuple(out.shape) == expected
    assert out.dtype == images.dtype and out.device == images.device
    assert torch.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    again = _call(model, which, images, K, 0)
    assert torch.equal(out, again), f"{name}: {which} samples differ under equally seeded generators"
    shared = _call(model, which, images, K, 1, share=True)
    assert tuple(shared.shape) == expected
    assert torch.equal(shared, _call(model, which, images, K, 1, share=True))


@pytest.mark.parametrize("name", MODELS)
def test_rater_present_masking(name: str) -> None:
    R, C = 3, 1
    model = make_model(name, C, R).train()
    present = torch.tensor([[True, False, True], [True, True, True]])
    batch = make_batch(C, R, present=present)

    def loss_of(b: dict) -> torch.Tensor:
        torch.manual_seed(123)
        with torch.no_grad():
            return model.loss(b)["loss"]

    base = loss_of(batch)
    flipped = {**batch, "masks": batch["masks"].clone()}
    flipped["masks"][0, 1] = 1.0 - flipped["masks"][0, 1]  # the absent rater's mask must not matter
    torch.testing.assert_close(loss_of(flipped), base, rtol=1e-6, atol=1e-6)
    fewer = {**batch, "rater_present": present.clone()}
    fewer["rater_present"][1, 2] = False  # a present rater becomes absent: the loss must change
    assert not torch.allclose(loss_of(fewer), base, rtol=1e-6, atol=1e-6), f"{name}: absent rater ignored"


@pytest.mark.parametrize("name", MODELS)
def test_loss_randomness_comes_from_the_generator(name: str) -> None:
    """Equally seeded generators give the same loss; the global RNG is neither used nor advanced."""
    model = make_model(name, 1, 3).train()
    batch = make_batch(1, 3)

    def loss_with(seed: int) -> torch.Tensor:
        with torch.no_grad():
            return model.loss(batch, generator=torch.Generator().manual_seed(seed))["loss"]

    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = loss_with(7)
    assert torch.equal(torch.get_rng_state(), state), f"{name}: loss(generator=...) touched the global RNG"
    torch.manual_seed(99)  # a different global state must not matter
    torch.testing.assert_close(loss_with(7), first, rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip(name: str, tmp_path) -> None:
    R, C = 2, 3
    model = make_model(name, C, R)
    # one optimisation step so that batch-norm statistics and weights differ from a fresh model
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.loss(make_batch(C, R))["loss"].backward()
    opt.step()
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), f"{name}: {k} differs after load"
    model.eval()
    loaded.eval()
    images = make_batch(C, R, seed=5)["image"]
    compared = 0
    for which in ("personalized", "diverse"):
        if getattr(model, f"supports_{which}"):
            assert torch.equal(_call(model, which, images, 2, 7), _call(loaded, which, images, 2, 7))
            compared += 1
    assert compared > 0, f"{name} supports neither sampling call"


@pytest.mark.parametrize("name", MODELS)
def test_a_saved_model_records_every_constructor_argument(name: str, tmp_path) -> None:
    import json

    cls = get_model_class(name)
    save_model(make_model(name), tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "model.json").read_text())["model"]
    params = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
    assert set(params) <= set(saved), f"{name}: not recorded: {sorted(set(params) - set(saved))}"


def test_a_changed_constructor_default_does_not_change_a_saved_model(tmp_path, monkeypatch) -> None:
    from proseg.models.proseg import ProSeg

    torch.manual_seed(0)
    model = create_model("proseg", in_channels=1, num_raters=2)
    save_model(model, tmp_path / "ckpt")
    # a later version changes a default that shapes the weights (z_channels 16 -> 8)
    names = [k for k, p in inspect.signature(ProSeg.__init__).parameters.items() if p.default is not p.empty]
    defaults = list(ProSeg.__init__.__defaults__)
    defaults[names.index("z_channels")] = 8
    monkeypatch.setattr(ProSeg.__init__, "__defaults__", tuple(defaults))
    assert ProSeg(1, 2).z_channels == 8
    back = load_model(tmp_path / "ckpt")
    assert back.z_channels == 16
    x = torch.randn(1, 1, H, W)
    torch.testing.assert_close(back.sample_diverse(x, 2, torch.Generator().manual_seed(0)),
                               model.sample_diverse(x, 2, torch.Generator().manual_seed(0)))
