"""Safe by default: sampling never changes a model, checkpoints that would hang or crash are refused with a message.

* The inference contract of :class:`MultiRaterModel`: ``sample_personalized`` / ``sample_diverse`` run in eval mode
  whatever mode the model is in, restore every submodule's ``training`` flag, never touch a parameter or buffer, and
  build no autograd graph unless called with ``grad=True``; ``load_model`` returns an eval-mode model.
* Bounded rejection sampling: a NaN / Inf / non-positive Gamma concentration raises ``NonFiniteError`` at once
  (the original loop never accepted a NaN and spun forever; these tests run under a ``signal.alarm`` guard so that
  they fail instead of hanging).
* ``load_model`` turns truncated / garbled weights, NaN weights and unbuildable configs into ``CheckpointError``
  naming the file; unknown model / preset / backbone names are ``ConfigError``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch import Tensor

from proseg.errors import CheckpointError, ConfigError, NonFiniteError
from proseg.models import MultiRaterModel, create_model, list_models, load_model, save_model
from proseg.models.backbones import create_backbone
from proseg.models.base import CONFIG_NAME, WEIGHTS_NAME

H = W = 16
B, R, C, K = 2, 3, 1, 2
MODELS = list_models()
# every registered model, plus D-Persona in stage 2, where model.train() leaves the frozen stage-1 parts in eval
# mode: the mixed per-module flags must come back exactly
CASES = [(n, {}) for n in MODELS] + [("dpersona", {"stage": 2})]
IDS = [n for n in MODELS] + ["dpersona-stage2"]


@contextlib.contextmanager
def deadline(seconds: int = 10) -> Iterator[None]:
    """Fail (instead of hanging) if the block runs longer than ``seconds`` (the original sampler loops forever)."""

    def fire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: an unbounded loop")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def make_model(name: str, overrides: dict | None = None, seed: int = 0) -> MultiRaterModel:
    torch.manual_seed(seed)
    model = create_model(name, in_channels=C, num_raters=R, preset="tiny", **(overrides or {}))
    assert isinstance(model, MultiRaterModel)
    return model


def images(seed: int = 3) -> Tensor:
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))


def samplers(model: MultiRaterModel) -> list[str]:
    out = [w for w in ("personalized", "diverse") if getattr(model, f"supports_{w}")]
    assert out, f"{type(model).__name__} supports neither sampling call"
    return out


def sample(model: MultiRaterModel, which: str, x: Tensor, seed: int = 7, **kw: object) -> Tensor:
    fn = model.sample_personalized if which == "personalized" else model.sample_diverse
    return fn(x, num_samples=K, generator=torch.Generator().manual_seed(seed), **kw)


def flags(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"sampling changed {changed[:6]}"


def trained_a_bit(name: str, overrides: dict | None = None) -> MultiRaterModel:
    """One SGD step in train mode so that BatchNorm statistics and weights are no longer a fresh model's."""
    model = make_model(name, overrides).train()
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(B, R, H, W, generator=g) > 0.5).float()
    masks[..., 4:10, 4:10] = 1.0
    batch = {"image": images(0), "masks": masks, "rater_present": torch.ones(B, R, dtype=torch.bool)}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.loss(batch, generator=g)["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model


# --- 1. the inference contract ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_sampling_in_train_mode_changes_no_state_and_no_flag(name: str, overrides: dict) -> None:
    model = trained_a_bit(name, overrides)
    before, modes = snapshot(model), flags(model)
    assert any(modes.values())
    x = images()
    for which in samplers(model):
        for _ in range(2):
            sample(model, which, x)
    assert_same_state(model, before)  # incl. BatchNorm running_mean/var and num_batches_tracked
    assert flags(model) == modes


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_samples_do_not_require_grad_by_default(name: str, overrides: dict) -> None:
    model = make_model(name, overrides).train()
    for which in samplers(model):
        out = sample(model, which, images())
        assert not out.requires_grad and out.grad_fn is None, f"{name}: {which} built an autograd graph"


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_train_and_eval_mode_give_identical_samples(name: str, overrides: dict) -> None:
    model = trained_a_bit(name, overrides)
    x = images()
    for which in samplers(model):
        in_train = sample(model.train(), which, x, seed=11)
        in_eval = sample(model.eval(), which, x, seed=11)
        assert torch.equal(in_train, in_eval), f"{name}: {which} depends on the mode the caller left"


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_grad_true_builds_a_graph_and_still_runs_in_eval_mode(name: str, overrides: dict) -> None:
    model = trained_a_bit(name, overrides)
    before, modes = snapshot(model), flags(model)
    for which in samplers(model):
        fn = model.sample_personalized if which == "personalized" else model.sample_diverse
        assert "grad" in inspect.signature(fn).parameters, f"{name}: {which} does not show grad="
        out = sample(model, which, images(), grad=True)
        if name == "dpersona" and overrides.get("stage") == 2 and which == "diverse":
            assert not out.requires_grad  # only frozen stage-1 parameters take part: nothing to differentiate
        else:
            assert out.requires_grad, f"{name}: {which}(grad=True) has no graph"
            out.float().mean().backward()
            assert any(p.grad is not None for p in model.parameters()), f"{name}: no parameter got a gradient"
            model.zero_grad(set_to_none=True)
        with torch.no_grad():  # grad=True does not override the caller's no_grad
            assert not sample(model, which, images(), grad=True).requires_grad
    assert_same_state(model, before)
    assert flags(model) == modes


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_load_model_returns_an_eval_mode_model(name: str, overrides: dict, tmp_path: Path) -> None:
    model = trained_a_bit(name, overrides)
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    training = [n for n, m in loaded.named_modules() if m.training]
    assert not training, f"{name}: modules in training mode after load_model: {training[:6]}"


class _Recorder(MultiRaterModel):
    """A model defined outside the package: it gets the contract from ``__init_subclass__`` too."""

    supports_personalized = supports_diverse = True

    def __init__(self) -> None:
        super().__init__(in_channels=1, num_raters=2)
        self.bn = nn.BatchNorm2d(1)
        self.conv = nn.Conv2d(1, 2, 1)
        self.seen: list[tuple[bool, bool, bool]] = []

    def sample_personalized(self, images: Tensor, num_samples: int = 1, generator: torch.Generator | None = None,
                            share_latent: bool = False) -> Tensor:
        self.seen.append((self.training, self.bn.training, torch.is_grad_enabled()))
        if images.shape[0] == 0:
            raise RuntimeError("boom")
        p = torch.sigmoid(self.conv(self.bn(images)))  # (B, R, H, W)
        return p[:, :, None].expand(-1, -1, num_samples, -1, -1)

    def sample_diverse(self, images: Tensor, num_samples: int = 1, generator: torch.Generator | None = None,
                       share_latent: bool = False) -> Tensor:
        return self.sample_personalized(images, num_samples, generator, share_latent).mean(1)  # a nested call


def test_a_subclass_runs_in_eval_mode_and_gets_its_flags_back_after_an_exception() -> None:
    model = _Recorder().train()
    model.conv.eval()  # a mixed state (as D-Persona's frozen parts): must come back exactly, not via train(mode)
    modes, before = flags(model), snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        model.sample_personalized(torch.zeros(0, 1, 4, 4))
    assert model.seen == [(False, False, False)], "the call did not run in eval mode under no_grad"
    assert flags(model) == modes
    out = model.sample_diverse(torch.randn(2, 1, 4, 4), 3, grad=True)  # nested: the outer grad=True holds
    assert out.requires_grad and model.seen[-1] == (False, False, True)
    assert flags(model) == modes
    assert_same_state(model, before)


# --- 2. bounded rejection sampling, non-finite weights ----------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0.0])
def test_sample_gamma_refuses_bad_concentrations_promptly(bad: float) -> None:
    from proseg.models.proseg import sample_dirichlet, sample_gamma

    with deadline(10), pytest.raises(NonFiniteError, match="concentration"):
        sample_gamma(torch.tensor([bad, 1.0]), torch.Generator().manual_seed(0))
    with deadline(10), pytest.raises(NonFiniteError):
        sample_dirichlet(torch.tensor([[1.0, bad]], requires_grad=True))


def test_gamma_rejection_loop_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A random source that always rejects (x = -1e6 makes v < 0) ends in an error, not an endless loop."""
    import proseg.models.proseg as ps

    def always_reject(kind: str, shape: tuple[int, ...], generator: object, like: Tensor) -> Tensor:
        return torch.full(tuple(shape), -1e6 if kind == "normal" else 0.5, dtype=like.dtype)

    monkeypatch.setattr(ps, "noise", always_reject)
    with deadline(10), pytest.raises(NonFiniteError, match="rounds"):
        ps.sample_gamma(torch.tensor([2.0, 0.5]))


def test_proseg_with_a_nan_concentration_raises_instead_of_hanging() -> None:
    model = make_model("proseg")
    with torch.no_grad():
        model.tau.raw_concentration[1, 0] = float("nan")
    with deadline(10), pytest.raises(NonFiniteError, match="tau.raw_concentration"):
        model.sample_personalized(images(), 2, torch.Generator().manual_seed(0))


def _saved_proseg(tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    save_model(make_model("proseg"), ckpt)
    return ckpt


def test_load_model_refuses_nan_weights_naming_file_and_tensor(tmp_path: Path) -> None:
    ckpt = _saved_proseg(tmp_path)
    state = load_file(str(ckpt / WEIGHTS_NAME))
    state["tau.raw_concentration"][0, 0] = float("nan")
    save_file(state, str(ckpt / WEIGHTS_NAME))
    with deadline(10), pytest.raises(CheckpointError) as info:
        load_model(ckpt)
    msg = str(info.value)
    assert str(ckpt / WEIGHTS_NAME) in msg and "tau.raw_concentration" in msg and "NaN" in msg


# --- 3. damaged files give messages, not tracebacks -------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "garbled", "empty"])
def test_load_model_damaged_weights_file_is_a_checkpoint_error(damage: str, tmp_path: Path) -> None:
    ckpt = _saved_proseg(tmp_path)
    f = ckpt / WEIGHTS_NAME
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbled": os.urandom(len(data)), "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="truncated or unreadable") as info:
        load_model(ckpt)
    assert str(f) in str(info.value)


@pytest.mark.parametrize("change", ["unknown_model", "unknown_arg", "bad_value", "not_json"])
def test_load_model_unbuildable_config_is_a_checkpoint_error(change: str, tmp_path: Path) -> None:
    ckpt = _saved_proseg(tmp_path)
    f = ckpt / CONFIG_NAME
    meta = json.loads(f.read_text())
    if change == "not_json":
        f.write_bytes(b"\xff\xfe{garbage")
    else:
        if change == "unknown_model":
            meta["model"]["name"] = "no_such_model"
        elif change == "unknown_arg":
            meta["model"]["no_such_argument"] = 1
        else:
            meta["model"]["rater_sampling"] = "sometimes"
        f.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as info:
        load_model(ckpt)
    assert str(f) in str(info.value)


def test_load_model_weights_of_another_shape_is_a_checkpoint_error(tmp_path: Path) -> None:
    ckpt = _saved_proseg(tmp_path)
    state = load_file(str(ckpt / WEIGHTS_NAME))
    state["tau.raw_concentration"] = torch.ones(R + 1, state["tau.raw_concentration"].shape[1])
    save_file(state, str(ckpt / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match="do not fit") as info:
        load_model(ckpt)
    assert str(ckpt / WEIGHTS_NAME) in str(info.value)


def test_load_model_missing_files_stay_file_not_found(tmp_path: Path) -> None:
    """A regression guard (also true before): a missing file is a FileNotFoundError, not a CheckpointError."""
    ckpt = _saved_proseg(tmp_path)
    (ckpt / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_model(ckpt)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nowhere")


# --- 4. registry names ------------------------------------------------------------------------------------------------
def test_unknown_model_preset_and_backbone_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown model 'nope'.*proseg"):
        create_model("nope")
    with pytest.raises(ConfigError, match="no preset 'huge'.*tiny"):
        create_model("proseg", preset="huge")
    with pytest.raises(ConfigError, match="unknown backbone 'vgg'"):
        create_backbone("vgg", 1)
    with pytest.raises(KeyError):  # still a KeyError for callers of earlier versions
        create_model("nope")
