"""PHiSeg (Baumgartner et al., MICCAI 2019): a hierarchy of spatial Gaussian latents at several resolutions.

Model (with ``Rn`` resolution levels = ``len(widths)`` and ``L`` latent levels, ``d = Rn - L``)
    * Prior p(z|x) and posterior q(z|x, y) nets of the same shape. An encoder pyramid of ``convs_per_level``
      3x3 conv + BatchNorm + ReLU per level, 2x2 average pooling between levels; the posterior's input is the
      image and the mask shifted by -0.5 (the reference feeds the 2-channel one-hot mask minus 0.5; for a
      binary mask its second channel is minus the first, which a linear conv absorbs exactly).
    * Latent level ``l`` (0 = finest) is a ``zdim``-channel map at resolution level ``l + d``. Top-down: the
      coarsest level's mean and scale come from the encoder features (mean: 3x3 conv, scale: 1x1 conv +
      softplus, as the reference); every finer level ``l`` upsamples ``z_{l+1}`` (bilinear + 2 convs of
      ``ups_width`` channels), concatenates it with the encoder features of its resolution, 2 convs, and 1x1
      convs to the mean and softplus scale. The posterior conditions each level on its own sample of the
      level above; in training the prior conditions on the **posterior's** samples (the reference's
      ``generation_mode=False``), when sampling on its own.
    * Likelihood p(y|z): per level, 2 convs on ``z_l``, ``d`` times (bilinear x2 + conv) back to resolution
      level ``l``; top-down combination (upsample the coarser combined map, conv, concatenate, 2 convs); one
      1x1 output conv per level, nearest-resized to the image. The likelihood sees the image only through z.
      The logits of the levels are summed: the prediction from levels >= l is ``s_l = sum_{k >= l} out_k``
      and the final prediction is ``s_0``. Binary segmentation uses one foreground logit (the reference's
      2-class softmax is the same family: the softmax of two summed logit maps is the sigmoid of their
      summed difference).

Training (``loss``)
    ``rater_sampling="one"``: one present rater per image drawn uniformly (the reference batch provider);
    ``"all"``: every present (image, rater) pair, batched over ``B * R``.
    ``loss = rec_weight * sum_l seg(s_l, y) + kl_weight * sum_l w_l KL_l`` where ``seg`` is the per-pixel
    cross-entropy summed over the pixels and averaged over the pairs (the reference's residual multinoulli
    loss, one term per level; ``deep_supervision=False`` keeps only ``s_0``), ``KL_l`` is the closed-form KL
    of the level's diagonal Gaussians summed over channels and positions and averaged over the pairs, and
    ``w_l = 4**l`` with ``exponential_weighting=True`` (``phiseg_7_5``; the code applies it to the KL terms),
    else 1. Terms: ``seg``, ``kl``, and per level ``seg_l<l>``, ``kl_l<l>`` (the KL already weighted).

Sampling
    * diverse: z from the prior hierarchy (top-down, each level from the generator), K draws; the encoder
      pyramid runs once per image, the conditional parts and the likelihood once per (image, draw).
    * personalized: not supported (no rater conditioning): :class:`NotSupportedError`.
    * ``share_latent=True`` shares the standard-normal noise of every level across the batch (slices of one
      volume get the same draw); PHiSeg has no image-global latent, so this correlates spatial maps.

Sizes: latent level ``l`` has ``ceil(H / 2**(l + d))`` rows; the paper's 7 resolution / 5 latent levels are
made for 128x128 images (2x2 coarsest latent). For smaller images use fewer levels (the ``tiny`` preset:
2 and 2); images smaller than ``2**(Rn - 1)`` pixels on a side are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from proseg.losses import gaussian_kl, get_loss, segmentation_loss, weighted_mean
from proseg.models._utils import cached_inference_copy, check_rater_sampling, noise, training_pairs
from proseg.models.backbones.unet import conv_block, down_path
from proseg.models.base import Batch, MultiRaterModel
from proseg.models.registry import register_model

_SIGMA_EPS = 1e-10  # the reference's log(sigma^2 + 1e-10)


def _up(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class LatentHierarchy(nn.Module):
    """PHiSeg's prior or posterior net (see the module docstring).

    ``encode(x (B, C_in, H, W))`` -> the encoder pyramid (list, finest first);
    ``forward(pyramid, expand, z_cond=None, eps=None)`` -> ``(z, mu, logvar)`` lists over the latent levels
    (finest first), each ``(B * expand, zdim, h_l, w_l)``. The pyramid is per image and is repeated
    ``expand`` times (``repeat_interleave``) for the conditional parts. With ``z_cond`` the level above is
    read from ``z_cond`` (the prior in training) and ``z`` is returned as None entries; otherwise each level
    is sampled with the noise ``eps[l]`` (same shapes).
    """

    def __init__(self, in_channels: int, widths: Sequence[int], latent_levels: int, zdim: int,
                 convs_per_level: int = 3, ups_width: int = 64, norm: bool = True) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        self.latent_levels, self.diff = latent_levels, len(widths) - latent_levels
        chans = (in_channels, *widths)
        self.pre = nn.ModuleList(conv_block(chans[i], chans[i + 1], convs_per_level, norm) for i in range(len(widths)))
        top = widths[latent_levels - 1 + self.diff]
        self.top_mu = nn.Conv2d(top, zdim, 3, padding=1)
        self.top_sigma = nn.Conv2d(top, zdim, 1)
        n = latent_levels - 1
        self.ups = nn.ModuleList(conv_block(zdim, ups_width, 2, norm) for _ in range(n))
        self.inp = nn.ModuleList(conv_block(widths[i + self.diff] + ups_width, widths[i], 2, norm) for i in range(n))
        self.mu = nn.ModuleList(nn.Conv2d(widths[i], zdim, 1) for i in range(n))
        self.sigma = nn.ModuleList(nn.Conv2d(widths[i], zdim, 1) for i in range(n))

    def encode(self, x: Tensor) -> list[Tensor]:
        return down_path(self.pre, x)

    @staticmethod
    def _logvar(sigma_pre: Tensor) -> tuple[Tensor, Tensor]:
        sigma = F.softplus(sigma_pre)
        return sigma, torch.log(sigma * sigma + _SIGMA_EPS)

    def forward(
        self,
        pyramid: list[Tensor],
        expand: int = 1,
        z_cond: list[Tensor] | None = None,
        eps: list[Tensor] | None = None,
    ) -> tuple[list[Tensor | None], list[Tensor], list[Tensor]]:
        n = self.latent_levels
        if (z_cond is None) == (eps is None):
            raise ValueError("give exactly one of z_cond (condition on given latents) or eps (sample)")
        z: list[Tensor | None] = [None] * n
        mu: list[Tensor] = [pyramid[0]] * n
        logvar: list[Tensor] = [pyramid[0]] * n
        top = pyramid[n - 1 + self.diff]
        m, (s, lv) = self.top_mu(top), self._logvar(self.top_sigma(top))
        mu[n - 1], logvar[n - 1] = m.repeat_interleave(expand, 0), lv.repeat_interleave(expand, 0)
        if eps is not None:
            z[n - 1] = mu[n - 1] + s.repeat_interleave(expand, 0) * eps[n - 1]
        for i in reversed(range(n - 1)):
            feat = pyramid[i + self.diff]
            above = z_cond[i + 1] if z_cond is not None else z[i + 1]
            assert above is not None
            h = self.ups[i](_up(above, feat.shape[-2:]))
            h = self.inp[i](torch.cat([feat.repeat_interleave(expand, 0), h], dim=1))
            mu[i] = self.mu[i](h)
            sigma, logvar[i] = self._logvar(self.sigma[i](h))
            if eps is not None:
                z[i] = mu[i] + sigma * eps[i]
        return z, mu, logvar


class Likelihood(nn.Module):
    """PHiSeg's likelihood net: ``forward(z list, sizes) -> per-level logits (S, H, W)`` (finest first), where
    ``sizes[i]`` is the spatial size of resolution level i (``sizes[0]`` the image's)."""

    def __init__(self, widths: Sequence[int], latent_levels: int, zdim: int, norm: bool = True) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        n, d = latent_levels, len(widths) - latent_levels
        self.latent_levels, self.diff = n, d
        self.post_z = nn.ModuleList(conv_block(zdim, widths[i], 2, norm) for i in range(n))
        self.post_z_ups = nn.ModuleList(
            nn.ModuleList(conv_block(widths[i], widths[i], 1, norm) for _ in range(d)) for i in range(n)
        )
        c_chans = [widths[i + d] for i in range(n - 1)] + [widths[n - 1]]  # channels of the combined maps
        self.ups_c = nn.ModuleList(conv_block(c_chans[i + 1], widths[i], 1, norm) for i in range(n - 1))
        self.post_c = nn.ModuleList(conv_block(2 * widths[i], widths[i + d], 2, norm) for i in range(n - 1))
        self.out = nn.ModuleList(nn.Conv2d(c_chans[i], 1, 1) for i in range(n))

    def forward(self, z: Sequence[Tensor], sizes: Sequence[Sequence[int]]) -> list[Tensor]:
        n, d = self.latent_levels, self.diff
        post_z = []
        for i in range(n):
            h = self.post_z[i](z[i])
            for j, conv in enumerate(self.post_z_ups[i]):  # resolution level i + d - 1 - j
                h = conv(_up(h, sizes[i + d - 1 - j]))
            post_z.append(h)
        post_c: list[Tensor] = [post_z[0]] * n
        post_c[n - 1] = post_z[n - 1]
        for i in reversed(range(n - 1)):
            up = self.ups_c[i](_up(post_c[i + 1], sizes[i]))
            post_c[i] = self.post_c[i](torch.cat([post_z[i], up], dim=1))
        size = tuple(sizes[0])
        return [F.interpolate(self.out[i](post_c[i]), size=size, mode="nearest")[:, 0] for i in range(n)]


# phiseg_7_5 (the constructor's defaults): 7 resolution levels (n0 = 32: 32, 64, 128, 192, 192, 192, 192), 5 latent
# levels, zdim 2, BatchNorm, 3 convs a level, exponential KL weighting, residual multinoulli loss, one random rater
# per image.
_PHISEG_7_5: dict[str, Any] = {
    "backbone_cfg": {"widths": (32, 64, 128, 192, 192, 192, 192), "norm": True},
    "latent_levels": 5,
    "zdim": 2,
    "convs_per_level": 3,
    "ups_width": 64,
}


@register_model("phiseg")
class PHiSeg(MultiRaterModel):
    """PHiSeg. See the module docstring for the model, the loss and the sampling.

    Args:
        in_channels: image channels C. num_raters: R (only used to read the masks).
        backbone: must be ``unet``: PHiSeg has no separate backbone, its prior/posterior encoders are the
            U-Net's down path and the likelihood its up path; backbone_cfg: ``widths`` (channels per
            resolution level, finest first; the paper ``(32, 64, 128, 192, 192, 192, 192)``) and ``norm``
            (BatchNorm, as the reference).
        latent_levels: L <= len(widths) (paper 5); zdim: channels of each latent map (paper 2).
        convs_per_level: 3x3 convs per encoder level (3); ups_width: channels of the latent upsampling
            convs (the reference's ``zdim * n0`` = 64).
        rater_sampling: ``one`` | ``all``; seg_loss: a :func:`segmentation_loss` kind (``bce`` = the paper's
            multinoulli likelihood); sum_over_pixels: with ``bce``, sum over the pixels (the reference);
        deep_supervision: one reconstruction term per level (the reference) or only the final one;
        exponential_weighting: KL level weights ``4**l``; kl_weight, rec_weight: the loss weights (1, 1).
    """

    supports_personalized = False
    supports_diverse = True

    PRESETS: dict[str, dict[str, Any]] = {
        "default": {},
        "reference": _PHISEG_7_5,  # the official code's configuration is the paper's (spelled out: pinned)
        "tiny": {
            "backbone_cfg": {"widths": (8, 16), "norm": True},
            "latent_levels": 2,
            "zdim": 2,
            "convs_per_level": 1,
            "ups_width": 8,
        },
    }

    def __init__(
        self,
        in_channels: int,
        num_raters: int,
        backbone: str = "unet",
        backbone_cfg: dict[str, Any] | None = None,
        latent_levels: int = 5,
        zdim: int = 2,
        convs_per_level: int = 3,
        ups_width: int = 64,
        rater_sampling: str = "one",
        seg_loss: str = "bce",
        sum_over_pixels: bool = True,
        deep_supervision: bool = True,
        exponential_weighting: bool = True,
        kl_weight: float = 1.0,
        rec_weight: float = 1.0,
    ) -> None:
        super().__init__(in_channels, num_raters)
        if backbone != "unet":
            raise ValueError(
                f"PHiSeg's encoders and decoder are part of its latent hierarchy; only backbone='unet' (with "
                f"backbone_cfg widths/norm) is supported, got {backbone!r}"
            )
        cfg = dict(backbone_cfg or {})
        unknown = set(cfg) - {"widths", "norm"}
        if unknown:
            raise ValueError(f"PHiSeg backbone_cfg accepts 'widths' and 'norm', got unknown keys {sorted(unknown)}")
        widths = tuple(int(w) for w in cfg.get("widths", (32, 64, 128, 192, 192, 192, 192)))
        norm = bool(cfg.get("norm", True))
        if not 1 <= latent_levels <= len(widths):
            raise ValueError(f"latent_levels must be in [1, len(widths)={len(widths)}], got {latent_levels}")
        if zdim < 1:
            raise ValueError(f"zdim must be >= 1, got {zdim}")
        get_loss(seg_loss)  # an unknown name fails here, not at the first step
        self.widths, self.latent_levels, self.zdim = widths, latent_levels, zdim
        self.rater_sampling, self.seg_loss = check_rater_sampling(rater_sampling), seg_loss
        self.sum_over_pixels = sum_over_pixels
        self.deep_supervision, self.exponential_weighting = deep_supervision, exponential_weighting
        self.kl_weight, self.rec_weight = float(kl_weight), float(rec_weight)
        self.prior = LatentHierarchy(in_channels, widths, latent_levels, zdim, convs_per_level, ups_width, norm)
        self.posterior = LatentHierarchy(in_channels + 1, widths, latent_levels, zdim, convs_per_level, ups_width,
                                         norm)
        self.likelihood = Likelihood(widths, latent_levels, zdim, norm)

    def level_weights(self) -> list[float]:
        """KL weight of each latent level, finest first."""
        return [4.0**i if self.exponential_weighting else 1.0 for i in range(self.latent_levels)]

    def _check_size(self, images: Tensor) -> None:
        need = 2 ** (len(self.widths) - 1)
        if min(images.shape[-2:]) < need:
            raise ValueError(
                f"PHiSeg with {len(self.widths)} resolution levels needs images of at least {need}x{need} "
                f"pixels, got {tuple(images.shape[-2:])}; use fewer levels (backbone_cfg widths, latent_levels)"
            )

    @staticmethod
    def _accumulate(levels: list[Tensor]) -> list[Tensor]:
        """``s_l = sum_{k >= l} out_k`` for every level (finest first)."""
        acc = list(levels)
        for i in reversed(range(len(levels) - 1)):
            acc[i] = acc[i + 1] + levels[i]
        return acc

    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``{"loss", "seg", "kl", "seg_l<l>", "kl_l<l>"...}`` (see the module docstring)."""
        image, masks, present = self._check_batch(batch)
        self._check_size(image)
        b, _, h, w = masks.shape
        _, weight, target = training_pairs(masks, present, self.rater_sampling, generator, pick="argmax")
        k = target.shape[1]
        s = b * k
        post_in = torch.cat(
            [image[:, None].expand(b, k, *image.shape[1:]), (target - 0.5)[:, :, None]], dim=2
        ).reshape(s, -1, h, w)
        post_pyr = self.posterior.encode(post_in)
        eps = []
        d = len(self.widths) - self.latent_levels
        for i in reversed(range(self.latent_levels)):
            eps.append(noise("normal", (s, self.zdim, *post_pyr[i + d].shape[-2:]), generator, post_pyr[0]))
        eps.reverse()
        z_q, mu_q, logvar_q = self.posterior(post_pyr, 1, eps=eps)
        z_list = [t for t in z_q if t is not None]
        _, mu_p, logvar_p = self.prior(self.prior.encode(image), k, z_cond=z_list)
        sizes = [f.shape[-2:] for f in post_pyr]
        s_acc = self._accumulate(self.likelihood(z_list, sizes))
        wf = weight.reshape(-1).to(s_acc[0].dtype)
        out: dict[str, Tensor] = {}
        seg_total = s_acc[0].new_zeros(())
        kl_total = s_acc[0].new_zeros(())
        tgt = target.reshape(s, h, w)
        for i, lw in enumerate(self.level_weights()):
            kl_i = gaussian_kl(mu_q[i], logvar_q[i], mu_p[i], logvar_p[i]).flatten(1).sum(1)
            kl_i = lw * weighted_mean(kl_i, wf)  # lw = 4**l or 1: an exact scaling
            kl_total = kl_total + kl_i
            out[f"kl_l{i}"] = kl_i.detach()
            if i == 0 or self.deep_supervision:
                seg_i = segmentation_loss(self.seg_loss, s_acc[i], tgt, wf)
                if self.seg_loss == "bce" and self.sum_over_pixels:
                    seg_i = seg_i * (h * w)
                seg_total = seg_total + seg_i
                out[f"seg_l{i}"] = seg_i.detach()
        total = self.rec_weight * seg_total + self.kl_weight * kl_total
        return {"loss": total, "seg": seg_total.detach(), "kl": kl_total.detach(), **out}

    def sample_diverse(
        self,
        images: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        share_latent: bool = False,
    ) -> Tensor:
        """``(B, K, H, W)`` foreground probabilities from z drawn top-down from the prior hierarchy."""
        self._check_sampling(images, num_samples)
        self._check_size(images)
        b, k = images.shape[0], num_samples
        prior, likelihood = self.prior, self.likelihood
        if not self.training and not torch.is_grad_enabled():
            # BatchNorm folded into the convolutions and channels-last: the same function, 1.5x faster on CPU
            prior, likelihood = cached_inference_copy(self.prior), cached_inference_copy(self.likelihood)
            images = images.contiguous(memory_format=torch.channels_last)
        pyr = prior.encode(images)
        d = len(self.widths) - self.latent_levels
        eps: list[Tensor] = [pyr[0]] * self.latent_levels
        for i in reversed(range(self.latent_levels)):  # every draw first: the chunking below cannot move them
            eps[i] = noise("normal", (1 if share_latent else b, k, self.zdim, *pyr[i + d].shape[-2:]), generator,
                           pyr[0]).expand(b, k, self.zdim, *pyr[i + d].shape[-2:])
        sizes = [f.shape[-2:] for f in pyr]
        out = images.new_empty(b, k, *images.shape[-2:])
        # runs of samples whose full-resolution maps stay about 10 x 128^2 per image: the likelihood's 128-channel
        # full-resolution activations of all K samples at once would take gigabytes
        step = max(1, (10 * 128 * 128) // (b * images.shape[-2] * images.shape[-1]))
        for k0 in range(0, k, step):
            n = min(k, k0 + step) - k0
            e = [t[:, k0 : k0 + n].reshape(b * n, *t.shape[2:]) for t in eps]
            z, _, _ = prior(pyr, n, eps=e)
            logits = self._accumulate(likelihood([t for t in z if t is not None], sizes))[0]
            out[:, k0 : k0 + n] = torch.sigmoid(logits.reshape(b, n, *logits.shape[-2:]))
        return out
