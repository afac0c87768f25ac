"""Pionono (Schmidt et al., ICCV 2023): a per-rater Gaussian latent injected into a light segmentation head.

Model
    * Backbone (``create_backbone``): image ``(B, C, H, W)`` -> features ``(B, F, H, W)``, run once per image.
    * Rater latent: one full-covariance Gaussian per rater, ``q(z|r) = N(mu_r, L_r L_r^T)`` with
      ``z in R^D``. ``L_r`` is lower-triangular with a **positive** diagonal (softplus + a 1e-5 floor), so
      ``L_r L_r^T`` is always positive-definite. The original code keeps ``scale_tril`` as an unconstrained
      parameter, which breaks ``MultivariateNormal`` as soon as a diagonal entry crosses zero.
    * Prior ``p(z) = N(0, sigma_p^2 I)`` (the original's ``z_prior_sigma``; it is used as the std, so the prior
      covariance is ``sigma_p^2 I``), KL in closed form (:func:`proseg.losses.full_gaussian_kl_isotropic`).
    * Head: ``z`` tiled over ``H x W``, concatenated with the features, ``head_layers`` 1x1 convolutions (ReLU
      between them) to one foreground logit. Because the convolutions are 1x1, the ``z`` part of the first
      convolution is a per-(image, sample) bias: the features go through the first convolution once and each
      latent only adds ``W_z z``; nothing is tiled.

Training (``loss``)
    One present rater per image drawn uniformly (``rater_sampling="one"``, as the reference training scripts) or
    every present rater of every image (``"all"``), ``mc_samples`` latents each (``z = mu_r + L_r eps``, eps from
    the generator). ``mc_reduction="loss"`` (default) averages the segmentation loss over the samples, the Monte-Carlo
    estimate of the ELBO's expected log-likelihood; ``"logits"`` averages the *logits* over the samples and takes
    the loss of the mean, as the reference code does (``mc_sampling(use_softmax=False)``).
    ``loss = seg + kl_weight * KL + reg_weight * sum_W ||W||_2`` where the KL is averaged over the used
    (image, rater) pairs (the reference averages the KL of each image's rater over the batch) and the
    regulariser is the sum of the L2 norms (not squared) of the head's hidden layers (the reference's
    ``l2_regularisation(head.layers)``: every head convolution except the last).

Sampling
    * personalized: ``z ~ q(z|r)`` for each rater, K draws each.
    * diverse: ``z`` from the uniform mixture of the rater posteriors (the paper's "sampling from all
      annotators"): each draw picks a rater uniformly at random (from the generator), then ``z ~ q(z|r)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from proseg.losses import full_gaussian_kl_isotropic, get_loss, segmentation_loss, weighted_mean
from proseg.models._utils import check_rater_sampling, l2_norm_sum, noise, training_pairs
from proseg.models.backbones import create_backbone
from proseg.models.base import Batch, MultiRaterModel
from proseg.models.registry import register_model

_DIAG_FLOOR = 1e-5


def _softplus_inverse(y: float) -> float:
    """``x`` with ``softplus(x) = y`` for ``y > 0``."""
    return y + math.log(-math.expm1(-y))


class RaterLatent(nn.Module):
    """The per-rater posteriors ``q(z|r) = N(mu_r, L_r L_r^T)``: a ``(R, D)`` mean table and a ``(R, D, D)`` raw
    lower-triangular table whose diagonal goes through softplus (+1e-5), so ``L_r`` is always a valid Cholesky
    factor. Initialisation as the reference: ``mu_r ~ N(0, init_std^2)`` per entry, ``L_r = prior_std * I``."""

    def __init__(self, num_raters: int, latent_dim: int, prior_std: float, posterior_init_std: float) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        if prior_std <= _DIAG_FLOOR:
            raise ValueError(f"prior_std must be > {_DIAG_FLOOR}, got {prior_std}")
        if posterior_init_std < 0:
            raise ValueError(f"posterior_init_std must be >= 0, got {posterior_init_std}")
        self.latent_dim = latent_dim
        self.mu = nn.Parameter(torch.randn(num_raters, latent_dim) * posterior_init_std)
        raw = torch.zeros(num_raters, latent_dim, latent_dim)
        raw.diagonal(dim1=-2, dim2=-1).fill_(_softplus_inverse(prior_std - _DIAG_FLOOR))
        self.raw_tril = nn.Parameter(raw)

    def scale_tril(self) -> Tensor:
        """``(R, D, D)`` lower-triangular Cholesky factors with a diagonal >= 1e-5."""
        diag = F.softplus(torch.diagonal(self.raw_tril, dim1=-2, dim2=-1)) + _DIAG_FLOOR
        return torch.tril(self.raw_tril, diagonal=-1) + torch.diag_embed(diag)

    def covariance(self) -> Tensor:
        """``(R, D, D)`` posterior covariances ``L L^T``."""
        lower = self.scale_tril()
        return lower @ lower.transpose(-1, -2)

    def sample(self, raters: Tensor, eps: Tensor) -> Tensor:
        """Reparameterised draws ``mu_r + L_r eps``: raters ``(...)`` long, eps ``(..., D)`` -> ``(..., D)``."""
        lower = self.scale_tril()[raters]  # gathered, no loop over raters
        return self.mu[raters] + (lower @ eps.unsqueeze(-1)).squeeze(-1)


class PiononoHead(nn.Module):
    """``head_layers`` 1x1 convolutions over ``[features, tile(z)]``: the first has ``F + D`` inputs, hidden ones
    ``head_channels``, the last one output (a foreground logit); ReLU between them; Xavier init, zero bias.

    ``forward(features (B, F, H, W), z (B, N, D)) -> (B, N, H, W)`` logits: the first convolution's feature
    part runs once per image, its ``z`` part is added as a bias per (image, sample).
    """

    def __init__(self, feature_channels: int, latent_dim: int, head_channels: int, head_layers: int) -> None:
        super().__init__()
        if head_layers < 2:
            raise ValueError(f"head_layers must be >= 2 (input and output convolutions), got {head_layers}")
        self.feature_channels = feature_channels
        self.first = nn.Conv2d(feature_channels + latent_dim, head_channels, 1)
        self.hidden = nn.ModuleList(nn.Conv2d(head_channels, head_channels, 1) for _ in range(head_layers - 2))
        self.last = nn.Conv2d(head_channels, 1, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def regularised_parameters(self) -> list[nn.Parameter]:
        """The reference's ``head.layers``: every convolution but the last."""
        return [*self.first.parameters(), *self.hidden.parameters()]

    def project_features(self, features: Tensor) -> Tensor:
        """The feature part of the first convolution: ``(B, F, H, W) -> (B, head_channels, H, W)``."""
        w = self.first.weight[:, : self.feature_channels]
        return F.conv2d(features, w)

    def forward(self, features: Tensor, z: Tensor) -> Tensor:
        b, n, _ = z.shape
        proj = self.project_features(features)
        w_z = self.first.weight[:, self.feature_channels :, 0, 0]  # (Ch, D)
        bias = z @ w_z.t() + self.first.bias  # (B, N, Ch)
        h = F.relu(proj.unsqueeze(1) + bias[..., None, None])  # (B, N, Ch, H, W)
        h = h.flatten(0, 1)
        for conv in self.hidden:
            h = F.relu(conv(h))
        return self.last(h).view(b, n, *features.shape[-2:])


@register_model("pionono")
class Pionono(MultiRaterModel):
    """Pionono: per-rater full-covariance Gaussian latent, injected into a 1x1-conv head (see module docstring).

    Args:
        in_channels: image channels C. num_raters: R.
        backbone, backbone_cfg: passed to :func:`proseg.models.backbones.create_backbone`.
        latent_dim: D (reference 8).
        head_layers: number of 1x1 convolutions in the head (reference 3: F+D -> F -> F -> 1).
        head_channels: hidden width of the head (default: the backbone's output channels, as the reference).
        prior_std: std of the isotropic Gaussian prior (reference 2.0).
        posterior_init_std: std of the random initial posterior means (reference 8.0).
        kl_weight: KL factor (reference 5e-4). reg_weight: factor of the head's L2 term (reference 1e-5).
        mc_samples: latents per (image, rater) in training (reference 5).
        mc_reduction: ``"loss"`` (average the loss over samples) or ``"logits"`` (the reference: loss of the
            sample-averaged logits).
        rater_sampling: ``"one"`` (one present rater per image, uniformly, as the reference training scripts: 1/R
            of the head cost) or ``"all"`` (every present rater of every image each step).
        seg_loss: ``"gdl"`` (pooled generalized Dice, the reference), ``"gdl_per_sample"``, ``"bce"``,
            ``"gdl+bce"``.
        latent_lr: learning rate of the latent table in :meth:`param_groups` (reference 0.02); None = model lr.
    """

    supports_personalized = True
    supports_diverse = True

    PRESETS: dict[str, dict[str, Any]] = {
        # The constructor's defaults: the paper/official-code hyper-parameters on our plain U-Net backbone; one
        # annotator per image per step as the official data loader (``"all"`` costs R times the head memory).
        "default": {},
        # As configured in the ProSeg/D-Persona code bases (lib/initialize_model.py, initialize_optimization.py).
        "reference": {"backbone": "resnet34_unet", "latent_dim": 8, "head_layers": 3, "prior_std": 2.0,
                      "posterior_init_std": 8.0, "kl_weight": 5e-4, "reg_weight": 1e-5, "mc_samples": 5,
                      "mc_reduction": "logits", "seg_loss": "gdl", "latent_lr": 0.02,
                      "rater_sampling": "one"},
        "tiny": {"backbone": "unet", "backbone_cfg": {"widths": (8, 16)}, "latent_dim": 3, "head_layers": 3,
                 "prior_std": 2.0, "posterior_init_std": 1.0, "kl_weight": 5e-4, "reg_weight": 1e-5,
                 "mc_samples": 2, "mc_reduction": "loss", "seg_loss": "gdl", "latent_lr": 0.02,
                 "rater_sampling": "all"},
    }

    def __init__(
        self,
        in_channels: int,
        num_raters: int,
        backbone: str = "unet",
        backbone_cfg: dict[str, Any] | None = None,
        latent_dim: int = 8,
        head_layers: int = 3,
        head_channels: int | None = None,
        prior_std: float = 2.0,
        posterior_init_std: float = 8.0,
        kl_weight: float = 5e-4,
        reg_weight: float = 1e-5,
        mc_samples: int = 5,
        mc_reduction: str = "loss",
        seg_loss: str = "gdl",
        latent_lr: float | None = 0.02,
        rater_sampling: str = "one",
    ) -> None:
        super().__init__(in_channels, num_raters)
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        if mc_reduction not in ("loss", "logits"):
            raise ValueError(f"mc_reduction must be 'loss' or 'logits', got {mc_reduction!r}")
        get_loss(seg_loss)  # an unknown name fails here, not at the first step
        self.rater_sampling = check_rater_sampling(rater_sampling)
        self.backbone = create_backbone(backbone, in_channels, **(backbone_cfg or {}))
        feat = int(self.backbone.out_channels)
        self.latent = RaterLatent(num_raters, latent_dim, prior_std, posterior_init_std)
        self.head = PiononoHead(feat, latent_dim, head_channels or feat, head_layers)
        self.latent_dim = latent_dim
        self.prior_std = float(prior_std)
        self.kl_weight = float(kl_weight)
        self.reg_weight = float(reg_weight)
        self.mc_samples = int(mc_samples)
        self.mc_reduction = mc_reduction
        self.seg_loss = seg_loss
        self.latent_lr = latent_lr

    # --- pieces ---------------------------------------------------------------------------------------
    def kl_per_rater(self) -> Tensor:
        """``(R,)`` KL( q(z|r) || N(0, prior_std^2 I) )."""
        return full_gaussian_kl_isotropic(self.latent.mu, self.latent.scale_tril(), self.prior_std)

    def head_l2(self) -> Tensor:
        """Sum of the L2 norms of the head's convolutions but the last (the reference's ``head.layers``)."""
        total = l2_norm_sum(self.head.regularised_parameters())
        assert total is not None  # the head has at least its first convolution
        return total

    def _logits_for(self, features: Tensor, raters: Tensor, eps: Tensor) -> Tensor:
        """Logits ``(B, N, K, H, W)`` for latents ``mu_r + L_r eps``: raters ``(B or 1, N)``, eps
        ``(B or 1, N, K, D)`` (a leading 1 shares the latent across the batch)."""
        b = features.shape[0]
        n, k, d = eps.shape[1:]
        z = self.latent.sample(raters[:, :, None].expand(-1, -1, k), eps).expand(b, n, k, d)
        return self.head(features, z.reshape(b, n * k, d)).view(b, n, k, *features.shape[-2:])

    # --- API ------------------------------------------------------------------------------------------
    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``{"loss", "seg", "kl", "reg"}``: ``seg`` over the used (image, rater) pairs (``rater_sampling``) and
        MC samples, ``kl`` the mean KL of the used pairs' raters, ``reg`` the head's L2 term (unweighted).
        Randomness (latents, the ``"one"`` rater choice) from ``generator``, else the global RNG."""
        image, masks, present = self._check_batch(batch)
        raters, weight, target = training_pairs(masks, present, self.rater_sampling, generator, pick="multinomial")
        b, n = raters.shape  # target (B, N, H, W)
        s = self.mc_samples
        features = self.backbone(image)
        eps = noise("normal", (b, n, s, self.latent_dim), generator, self.latent.mu)
        logits = self._logits_for(features, raters, eps)  # (B, N, S, H, W)
        weight = weight.to(logits.dtype)
        if self.mc_reduction == "loss":
            seg = segmentation_loss(
                self.seg_loss,
                logits.flatten(0, 2),
                target.unsqueeze(2).expand(-1, -1, s, -1, -1).flatten(0, 2),
                weight.unsqueeze(2).expand(-1, -1, s).flatten(),
            )
        else:
            seg = segmentation_loss(self.seg_loss, logits.mean(2).flatten(0, 1), target.flatten(0, 1), weight.flatten())
        kl = weighted_mean(self.kl_per_rater().to(weight.dtype)[raters], weight)
        reg = self.head_l2()
        total = seg + self.kl_weight * kl + self.reg_weight * reg
        return {"loss": total, "seg": seg.detach(), "kl": kl.detach(), "reg": reg.detach()}

    def sample_personalized(
        self,
        images: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        share_latent: bool = False,
    ) -> Tensor:
        """``(B, R, K, H, W)`` probabilities: for each rater r, K draws ``z ~ q(z|r)``."""
        self._check_sampling(images, num_samples)
        features = self.backbone(images)
        n = 1 if share_latent else features.shape[0]
        raters = torch.arange(self.num_raters, device=features.device).expand(n, -1)
        eps = noise("normal", (n, self.num_raters, num_samples, self.latent_dim), generator, self.latent.mu)
        return torch.sigmoid(self._logits_for(features, raters, eps))

    def sample_diverse(
        self,
        images: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        share_latent: bool = False,
    ) -> Tensor:
        """``(B, K, H, W)`` probabilities with ``z`` from the uniform mixture of the R rater posteriors: each draw
        picks a rater uniformly (from ``generator``), then ``z ~ q(z|r)``."""
        self._check_sampling(images, num_samples)
        features = self.backbone(images)
        b, k, d = features.shape[0], num_samples, self.latent_dim
        n = 1 if share_latent else b
        if generator is None:
            raters = torch.randint(self.num_raters, (n, k), device=features.device)
        else:
            raters = torch.randint(self.num_raters, (n, k), generator=generator, device=generator.device)
            raters = raters.to(features.device)
        eps = noise("normal", (n, k, 1, d), generator, self.latent.mu)  # one "sample" per (image, draw)
        return torch.sigmoid(self._logits_for(features, raters, eps)).view(b, k, *features.shape[-2:])

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Two groups: the network at ``lr``/``weight_decay``; the latent table at ``latent_lr`` without decay."""
        latent = list(self.latent.parameters())
        ids = {id(p) for p in latent}
        rest = [p for p in self.parameters() if id(p) not in ids and p.requires_grad]
        latent_lr = lr if self.latent_lr is None else self.latent_lr
        return [
            {"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "network"},
            {"params": latent, "lr": latent_lr, "weight_decay": 0.0, "name": "latent"},
        ]

    # --- a new rater (docs/adaptation.md) ------------------------------------------------------------------------
    def rater_tensors(self) -> list[tuple[str, nn.Module, str]]:
        """Per-rater tensors: the posterior mean table and the raw Cholesky table of q(z|r)."""
        return [("latent.mu", self.latent, "mu"), ("latent.raw_tril", self.latent, "raw_tril")]

    def prior_rater_rows(self) -> dict[str, Tensor]:
        """``init="prior"``: q(z|new) = N(0, prior_std^2 I), the prior."""
        d = self.latent.latent_dim
        raw = torch.zeros(d, d)
        raw.diagonal().fill_(_softplus_inverse(self.prior_std - _DIAG_FLOOR))
        return {"latent.mu": torch.zeros(d), "latent.raw_tril": raw}

