"""CM-Global / CM-Pixel: valid column-stochastic matrices, the loss on hand-made cases (identity CM -> NLL of
p_hat; a hand-computed 2x2 case), the trace term, rater masking, outputs on probabilities, diverse semantics."""

import math

import pytest
import torch
import torch.nn.functional as F

from proseg.models import NotSupportedError, create_model
from proseg.models.confusion import (
    REFERENCE_INIT_DIAG,
    CMGlobal,
    CMPixel,
    confusion_nll,
    confusion_trace,
    rater_log_probs,
)

R, C, H = 3, 2, 12


def _model(name: str, **overrides):
    torch.manual_seed(0)
    return create_model(name, in_channels=C, num_raters=R, preset="tiny", **overrides)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(2, C, H, H, generator=g),
        "masks": (torch.rand(2, R, H, H, generator=g) > 0.6).float(),
        "rater_present": torch.tensor([[True, True, False], [True, False, True]]),
    }


def _perturb(model) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.cm_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 2.0)


@pytest.mark.parametrize("name", ["cm_global", "cm_pixel"])
def test_matrices_are_column_stochastic(name: str) -> None:
    model = _model(name)
    _perturb(model)
    images = _batch()["image"]
    cm = model.confusion_matrices(images).detach()
    if name == "cm_global":
        assert cm.shape == (R, 2, 2)
        col_sums = cm.sum(-2)  # over the observed label i
    else:
        assert cm.shape == (2, R, 2, 2, H, H)
        col_sums = cm.sum(2)
    torch.testing.assert_close(col_sums, torch.ones_like(col_sums))
    assert ((cm >= 0) & (cm <= 1)).all()


def test_initial_matrices_near_identity() -> None:
    model = _model("cm_global", cm_init_diag=0.8)
    cm = model.confusion_matrices().detach()
    torch.testing.assert_close(cm, torch.tensor([[0.8, 0.2], [0.2, 0.8]]).expand(R, -1, -1))
    ref = create_model("cm_global", in_channels=1, num_raters=2, preset="tiny", cm_init_diag=REFERENCE_INIT_DIAG)
    # the reference starts at softplus(eye(2)) normalised per column
    sp = F.softplus(torch.eye(2))
    torch.testing.assert_close(ref.confusion_matrices().detach()[0], sp / sp.sum(0, keepdim=True))
    pix = _model("cm_pixel", cm_init_diag=0.9)
    with torch.no_grad():
        for m in pix.cm_head.modules():  # zero the weights: only the bias (the init) is left
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
    cm = pix.confusion_matrices(_batch()["image"]).detach()
    torch.testing.assert_close(cm[:, :, 1, 1], torch.full_like(cm[:, :, 1, 1], 0.9))


def test_identity_cm_gives_nll_of_p_hat() -> None:
    g = torch.Generator().manual_seed(0)
    p_fg = torch.rand(2, 5, 5, generator=g) * 0.98 + 0.01
    log_p_true = torch.stack([(1 - p_fg).log(), p_fg.log()], 1)  # (B, 2, H, W)
    masks = (torch.rand(2, R, 5, 5, generator=g) > 0.5).float()
    log_cm = torch.eye(2).log().expand(R, -1, -1)  # exact identity (log 0 = -inf off the diagonal)
    weight = torch.ones(2, R)
    nll = confusion_nll(rater_log_probs(log_p_true, log_cm), masks, weight)
    bce = F.binary_cross_entropy(p_fg[:, None].expand(-1, R, -1, -1), masks)
    torch.testing.assert_close(nll, bce)


def test_hand_computed_case_on_probabilities() -> None:
    # p_hat = [0.2, 0.8]; A = [[0.9, 0.3], [0.1, 0.7]] (columns = true class) -> p(observe fg) = 0.1*0.2 + 0.7*0.8
    log_p_true = torch.tensor([0.2, 0.8]).log().view(1, 2, 1, 1)
    a = torch.tensor([[0.9, 0.3], [0.1, 0.7]])
    a2 = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    log_cm = torch.stack([a, a2]).log()  # two raters
    lp = rater_log_probs(log_p_true, log_cm)  # (1, 2, 2, 1, 1)
    torch.testing.assert_close(lp.exp()[0, :, 1, 0, 0], torch.tensor([0.58, 0.5]))
    masks = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    nll = confusion_nll(lp, masks, torch.ones(1, 2))
    torch.testing.assert_close(nll, torch.tensor((-math.log(0.58) - math.log(0.5)) / 2))
    # an absent rater carries no weight
    nll1 = confusion_nll(lp, masks, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(nll1, torch.tensor(-math.log(0.58)))
    # trace of the present raters: (1.6 + 1.0) / 2, and 1.6 with rater 2 absent
    cm = torch.stack([a, a2])
    torch.testing.assert_close(confusion_trace(cm, torch.ones(1, 2)), torch.tensor(1.3))
    torch.testing.assert_close(confusion_trace(cm, torch.tensor([[1.0, 0.0]])), torch.tensor(1.6))


def test_model_loss_terms_and_trace_weight() -> None:
    model = _model("cm_global", trace_weight=0.5)
    with torch.no_grad():
        model.cm_table.copy_(torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]],
                                           [[-1.0, 0.0], [0.0, 3.0]]]))
    batch = _batch()
    out = model.loss(batch)
    assert set(out) == {"loss", "nll", "trace"}
    s = torch.sigmoid
    traces = torch.stack([s(torch.tensor(2.0)) + s(torch.tensor(1.0)), torch.tensor(1.0),
                          s(torch.tensor(-1.0)) + s(torch.tensor(3.0))])
    present = batch["rater_present"].float()
    expected_trace = (present * traces).sum() / present.sum()
    torch.testing.assert_close(out["trace"], expected_trace)
    torch.testing.assert_close(out["loss"].detach(), out["nll"] + 0.5 * expected_trace)
    # the NLL equals the functional one on the model's own p_hat and matrices
    p_fg = model.predict_true(batch["image"]).detach()
    log_p_true = torch.stack([(1 - p_fg).log(), p_fg.log()], 1)
    ref = confusion_nll(rater_log_probs(log_p_true, model.confusion_matrices().detach().log()), batch["masks"],
                        present)
    torch.testing.assert_close(out["nll"], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["cm_global", "cm_pixel"])
def test_absent_raters_contribute_nothing(name: str) -> None:
    model = _model(name)
    _perturb(model)
    batch = _batch()
    out = model.loss(batch)
    masks = batch["masks"].clone()
    masks[0, 2] = 1.0 - masks[0, 2]
    masks[1, 1] = 1.0 - masks[1, 1]
    out2 = model.loss({**batch, "masks": masks})
    torch.testing.assert_close(out["loss"], out2["loss"])
    masks[1, 2] = 1.0 - masks[1, 2]  # present
    out3 = model.loss({**batch, "masks": masks})
    assert (out3["nll"] - out["nll"]).abs() > 1e-4
    out["loss"].backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


@pytest.mark.parametrize("name", ["cm_global", "cm_pixel"])
def test_personalized_is_cm_times_probabilities(name: str) -> None:
    model = _model(name).eval()
    _perturb(model)
    images = _batch()["image"]
    with torch.no_grad():
        pers = model.sample_personalized(images, 3)
        p = model.predict_true(images)  # (B, H, W)
        cm = model.confusion_matrices(images)
    assert pers.shape == (2, R, 3, H, H)
    torch.testing.assert_close(pers[:, :, 0], pers[:, :, 2])  # deterministic: K identical copies
    if name == "cm_global":
        expected = cm[None, :, 1, 0, None, None] * (1 - p[:, None]) + cm[None, :, 1, 1, None, None] * p[:, None]
    else:
        expected = cm[:, :, 1, 0] * (1 - p[:, None]) + cm[:, :, 1, 1] * p[:, None]
    torch.testing.assert_close(pers[:, :, 0], expected, rtol=1e-5, atol=1e-6)
    assert ((pers >= 0) & (pers <= 1)).all()


def test_diverse_cycles_raters_or_raises() -> None:
    model = _model("cm_pixel").eval()
    images = _batch()["image"]
    with torch.no_grad():
        pers = model.sample_personalized(images, 1)[:, :, 0]
        div = model.sample_diverse(images, 7, torch.Generator().manual_seed(0))
        div2 = model.sample_diverse(images, 7, torch.Generator().manual_seed(1))
    assert div.shape == (2, 7, H, H)
    torch.testing.assert_close(div, pers[:, [0, 1, 2, 0, 1, 2, 0]])
    torch.testing.assert_close(div, div2)  # deterministic
    strict = _model("cm_global", diverse_from_raters=False)
    assert strict.supports_diverse is False and CMGlobal.supports_diverse is True
    with pytest.raises(NotSupportedError, match="diverse_from_raters"):
        strict.sample_diverse(images, 4)


def test_predict_true_and_param_groups() -> None:
    model = _model("cm_global")
    images = _batch()["image"]
    p = model.predict_true(images)
    assert p.shape == (2, H, H) and ((p >= 0) & (p <= 1)).all()
    groups = {g["name"]: g for g in model.param_groups(lr=1e-4, weight_decay=1e-4)}
    assert groups["cm"]["lr"] == 0.01 and groups["cm"]["params"] == [model.cm_table]
    assert groups["cm"]["weight_decay"] == 0.0
    pix = _model("cm_pixel", cm_lr=0.05)
    assert isinstance(pix, CMPixel)
    groups = {g["name"]: g for g in pix.param_groups(lr=1e-4)}
    assert groups["cm"]["lr"] == 0.05
    assert {id(p) for p in groups["cm"]["params"]} == {id(p) for p in pix.cm_head.parameters()}
    assert sum(len(g["params"]) for g in groups.values()) == sum(1 for _ in pix.parameters())
    with pytest.raises(ValueError, match="depend on the image"):
        pix.confusion_matrices()


def test_rater_sampling_one() -> None:
    model = _model("cm_global")
    _perturb(model)
    batch = _batch()
    batch["rater_present"] = torch.tensor([[False, True, False], [False, False, True]])
    out_all = model.loss(batch)
    model.rater_sampling = "one"
    torch.testing.assert_close(model.loss(batch)["loss"], out_all["loss"])  # only one choice per image
    batch["rater_present"] = torch.tensor([[True, True, True], [True, True, True]])
    model.rater_sampling = "all"
    pair_nll = torch.zeros(2, R)  # NLL of each single (image, rater) pair
    for b in range(2):
        for r in range(R):
            present = torch.zeros(2, R, dtype=torch.bool)
            present[b, r] = True
            pair_nll[b, r] = model.loss({**batch, "rater_present": present})["nll"]
    combos = (pair_nll[0][:, None] + pair_nll[1][None, :]) / 2  # (r0, r1)
    model.rater_sampling = "one"
    seen = set()
    for seed in range(6):
        nll = model.loss(batch, generator=torch.Generator().manual_seed(seed))["nll"]
        again = model.loss(batch, generator=torch.Generator().manual_seed(seed))["nll"]
        torch.testing.assert_close(nll, again)  # deterministic under the generator
        match = (combos - nll).abs() < 1e-5
        assert match.any()  # one rater per image
        seen.add(tuple(match.nonzero()[0].tolist()))
    assert len(seen) > 1  # and the choice varies with the generator
