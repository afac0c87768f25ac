"""Probabilistic U-Net (Kohl et al., NeurIPS 2018): an image-global Gaussian latent injected into a U-Net.

Model
    * Backbone (``create_backbone``): image ``(B, C, H, W)`` -> features ``(B, F, H, W)``, run once per image.
    * Prior net p(z|x) and posterior net q(z|x, y): conv encoders (``convs_per_block`` 3x3 convs per level,
      average pooling between levels, no normalisation as the reference), spatial mean, 1x1 conv to an
      axis-aligned Gaussian of dimension ``latent_dim`` (paper 6). The posterior sees the image concatenated
      with one rater's mask shifted by ``-mask_shift`` (Kohl's TF code uses ``seg - 0.5``; the PyTorch ports
      concatenate the raw mask: ``mask_shift=0``).
    * fcomb: ``z`` tiled over ``H x W``, concatenated with the features, ``fcomb_convs`` 1x1 convolutions to one
      foreground logit (computed without tiling: the ``z`` part of the first 1x1 conv is a per-sample bias).

Training (``loss``)
    ``rater_sampling="one"``: for each image one rater drawn uniformly among its present raters (the reference
    draws one of the 4 per image); ``"all"``: every present (image, rater) pair, batched over ``B * R``.
    One posterior sample ``z = mu_q + sigma_q * eps`` per pair (eps from the generator).
    ``loss = seg + kl_weight * KL(q || p) + reg_weight * sum_W ||W||_2`` over the prior, posterior and fcomb
    weights (the ports' ``l2_regularisation``, reg 1e-5). ``seg`` is ``segmentation_loss(seg_loss, ...)``:
    ``"bce"`` with ``sum_over_pixels=True`` is Kohl's ELBO (cross-entropy summed over pixels, averaged over
    pairs); ``"gdl"`` is the generalized Dice of the ProSeg/D-Persona code bases. The KL is summed over the
    latent dimensions and averaged over the used pairs; absent raters contribute nothing (their masks are
    never read).

Sampling
    * diverse: ``z ~ p(z|x)``, K draws; the backbone and the prior run once per image.
    * personalized: not supported (the Prob. U-Net has no notion of a rater): :class:`NotSupportedError`.
    * ``share_latent=True`` shares the standard-normal noise of each draw across the batch (the batch is the
      slices of one volume); the prior mean and scale stay per slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from proseg.losses import gaussian_kl, get_loss, segmentation_loss, weighted_mean
from proseg.models._gaussian_nets import AxisAlignedConvGaussian, Fcomb, reparameterize
from proseg.models._utils import check_rater_sampling, l2_norm_sum, noise, training_pairs
from proseg.models.backbones import create_backbone
from proseg.models.base import Batch, MultiRaterModel
from proseg.models.registry import register_model


@register_model("prob_unet")
class ProbUNet(MultiRaterModel):
    """Probabilistic U-Net. See the module docstring for the model, the loss and the sampling.

    Args:
        in_channels: image channels C. num_raters: R (only used to read the masks: there is no per-rater part).
        backbone, backbone_cfg: passed to :func:`create_backbone` (``unet`` widths ..., or ``resnet34_unet``).
        latent_dim: dimension of z (paper 6).
        prior_widths: channels of the prior/posterior encoder levels; prior_convs_per_block: 3x3 convs per
            level (reference 3); prior_norm: BatchNorm in those encoders (reference: none).
        fcomb_width: channels of the fcomb hidden layers (None = the backbone's feature channels, as the
            reference's ``num_filters[0]``); fcomb_convs: 1x1 convs including the output one (reference 4).
        seg_loss: ``bce`` | ``gdl`` | ``gdl_per_sample`` | ``gdl+bce`` (see :func:`segmentation_loss`);
        sum_over_pixels: with ``bce``, sum the per-pixel cross-entropy instead of averaging it (Kohl's ELBO).
        kl_weight: beta (Kohl 1, the ProSeg/D-Persona code 1, Knegt's port 10); reg_weight: L2 factor (1e-5).
        rater_sampling: ``one`` (reference) or ``all``; mask_shift: subtracted from the posterior's mask input.
    """

    supports_personalized = False
    supports_diverse = True

    PRESETS: dict[str, dict[str, Any]] = {
        # The constructor's defaults, Kohl et al. 2018 on LIDC: U-Net (32, 64, 128, 192), latent 6, 3 convs a block,
        # 4 fcomb convs, cross-entropy summed over pixels + KL, one rater per image, mask - 0.5 in the posterior.
        "default": {},
        # The ProSeg / D-Persona repos' prob_unet: smp ResNet-34 U-Net (16 feature channels), latent 6,
        # prior/posterior filters (16, 32, 64, 128, 256), GDL + 1.0 * KL, reg 1e-5, raw mask in the posterior.
        "reference": {
            "backbone": "resnet34_unet",
            "backbone_cfg": {},
            "latent_dim": 6,
            "prior_widths": (16, 32, 64, 128, 256),
            "seg_loss": "gdl",
            "sum_over_pixels": False,
            "kl_weight": 1.0,
            "reg_weight": 1e-5,
            "rater_sampling": "one",
            "mask_shift": 0.0,
        },
        "tiny": {
            "backbone": "unet",
            "backbone_cfg": {"widths": (8, 16)},
            "latent_dim": 2,
            "prior_widths": (8, 16),
            "prior_convs_per_block": 1,
            "fcomb_convs": 3,
        },
    }

    def __init__(
        self,
        in_channels: int,
        num_raters: int,
        backbone: str = "unet",
        backbone_cfg: dict[str, Any] | None = None,
        latent_dim: int = 6,
        prior_widths: Sequence[int] = (32, 64, 128, 192),
        prior_convs_per_block: int = 3,
        prior_norm: bool = False,
        fcomb_width: int | None = None,
        fcomb_convs: int = 4,
        seg_loss: str = "bce",
        sum_over_pixels: bool = True,
        kl_weight: float = 1.0,
        reg_weight: float = 1e-5,
        rater_sampling: str = "one",
        mask_shift: float = 0.5,
    ) -> None:
        super().__init__(in_channels, num_raters)
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        get_loss(seg_loss)  # an unknown name fails here, not at the first step
        self.latent_dim = latent_dim
        self.seg_loss = seg_loss
        self.sum_over_pixels = sum_over_pixels
        self.kl_weight = float(kl_weight)
        self.reg_weight = float(reg_weight)
        self.rater_sampling = check_rater_sampling(rater_sampling)
        self.mask_shift = float(mask_shift)

        self.backbone = create_backbone(backbone, in_channels, **(backbone_cfg or {}))
        feat = int(self.backbone.out_channels)
        self.prior = AxisAlignedConvGaussian(in_channels, prior_widths, latent_dim, prior_convs_per_block, prior_norm)
        self.posterior = AxisAlignedConvGaussian(
            in_channels + self._posterior_mask_channels(), prior_widths, latent_dim, prior_convs_per_block, prior_norm
        )
        self.fcomb = Fcomb(feat, latent_dim, fcomb_width or feat, fcomb_convs)

    # --- pieces subclasses (D-Persona) reuse ---------------------------------------------------------
    def _posterior_mask_channels(self) -> int:
        return 1

    def _seg_term(self, logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        """``logits``/``target`` ``(S, H, W)``, ``weight`` ``(S,)``."""
        seg = segmentation_loss(self.seg_loss, logits, target, weight)
        if self.seg_loss == "bce" and self.sum_over_pixels:
            seg = seg * logits[0].numel()
        return seg

    def _reg_term(self, like: Tensor) -> Tensor:
        """``reg_weight`` times the L2 sum of the trainable prior, posterior and fcomb weights."""
        if self.reg_weight == 0.0:
            return like.new_zeros(())
        params = [p for m in (self.prior, self.posterior, self.fcomb) for p in m.parameters() if p.requires_grad]
        total = l2_norm_sum(params, sequential=True)
        return like.new_zeros(()) if total is None else self.reg_weight * total

    def _targets(
        self, masks: Tensor, present: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """The (image, rater) pairs trained on: ``target (B, K, H, W)`` and ``weight (B, K)`` (K = 1 or R)."""
        _, weight, target = training_pairs(masks, present, self.rater_sampling, generator, pick="argmax")
        return target, weight

    def _prior_samples(self, images: Tensor, shape: tuple[int, ...], generator: torch.Generator | None,
                       share_latent: bool) -> tuple[Tensor, Tensor]:
        """Backbone features ``(B, F, H, W)`` and prior samples ``z`` ``(B, *shape, L)`` (``share_latent``: one
        standard-normal draw per sample for the whole batch)."""
        feats = self.backbone(images)
        mu, logvar = self.prior(images)
        eps = noise("normal", (1 if share_latent else images.shape[0], *shape, self.latent_dim), generator, mu)
        lead = (slice(None),) + (None,) * len(shape)
        return feats, reparameterize(mu[lead], logvar[lead], eps)

    # --- the API -------------------------------------------------------------------------------------
    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``{"loss", "seg", "kl", "reg"}`` for ``batch`` (see the module docstring)."""
        image, masks, present = self._check_batch(batch)
        b, _, h, w = masks.shape
        feats = self.backbone(image)
        mu_p, logvar_p = self.prior(image)
        target, weight = self._targets(masks, present, generator)  # (B, K, H, W), (B, K)
        k = target.shape[1]
        post_in = torch.cat(
            [image[:, None].expand(b, k, *image.shape[1:]), (target - self.mask_shift)[:, :, None]], dim=2
        ).reshape(b * k, -1, h, w)
        mu_q, logvar_q = (t.reshape(b, k, -1) for t in self.posterior(post_in))
        z = reparameterize(mu_q, logvar_q, noise("normal", mu_q.shape, generator, mu_q))
        logits = self.fcomb(feats, z)  # (B, K, H, W)
        wf = weight.reshape(-1).to(logits.dtype)
        seg = self._seg_term(logits.reshape(b * k, h, w), target.reshape(b * k, h, w), wf)
        kl = gaussian_kl(mu_q, logvar_q, mu_p[:, None], logvar_p[:, None]).sum(-1).reshape(-1)
        kl = weighted_mean(kl, wf)
        reg = self._reg_term(kl)
        total = seg + self.kl_weight * kl + reg
        return {"loss": total, "seg": seg.detach(), "kl": kl.detach(), "reg": reg.detach()}

    def sample_diverse(
        self,
        images: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        share_latent: bool = False,
    ) -> Tensor:
        """``(B, K, H, W)`` foreground probabilities from ``z ~ p(z|x)``."""
        self._check_sampling(images, num_samples)
        feats, z = self._prior_samples(images, (num_samples,), generator, share_latent)
        return torch.sigmoid(self.fcomb(feats, z)).to(images.dtype)
