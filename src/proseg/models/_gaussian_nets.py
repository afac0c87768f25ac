"""Building blocks shared by the Gaussian-latent baselines (Prob. U-Net, PHiSeg, D-Persona).

Everything here is vectorized over the batch and over samples, and every random draw comes from an explicit
``torch.Generator`` (standard-normal noise drawn with :func:`randn_like_gen` and reparameterized by hand:
``torch.distributions``' ``rsample`` ignores generators).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from proseg.models.backbones.unet import conv_block


def randn(shape: Sequence[int], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard-normal noise of ``shape`` on ``like``'s device and dtype, drawn from ``generator``.

    The noise is drawn on the generator's own device (so a CPU generator gives the same numbers whatever
    device the model runs on) and then moved.
    """
    if generator is None:
        return torch.randn(tuple(shape), device=like.device, dtype=like.dtype)
    eps = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return eps.to(device=like.device, dtype=like.dtype)


def rand(shape: Sequence[int], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Uniform [0, 1) noise, same device rules as :func:`randn`."""
    if generator is None:
        return torch.rand(tuple(shape), device=like.device, dtype=torch.float32)
    u = torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return u.to(device=like.device)


def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """``mu + exp(logvar / 2) * eps`` (shapes broadcast)."""
    return mu + torch.exp(0.5 * logvar) * eps


def choose_present_rater(present: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """One rater per image, uniformly among the present ones.

    Args:
        present: ``(B, R)`` bool.

    Returns:
        ``idx`` ``(B,)`` long (0 where no rater is present) and ``valid`` ``(B,)`` bool (False where no rater of
        that image is present: the image then contributes nothing).
    """
    u = rand(present.shape, generator, present)
    u = torch.where(present, u, torch.full_like(u, -1.0))  # absent raters can never win the argmax
    return u.argmax(dim=1), present.any(dim=1)


def training_pairs(
    masks: Tensor, present: Tensor, mode: str, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """The (image, rater) pairs a loss is computed on.

    Args:
        masks: ``(B, R, H, W)``; present: ``(B, R)`` bool; mode: ``"one"`` (one present rater per image, drawn
            uniformly from ``generator``, as the reference training scripts) or ``"all"`` (every rater).

    Returns:
        ``target`` ``(B, K, H, W)`` and ``weight`` ``(B, K)`` bool with K = 1 (``one``) or R (``all``). Pairs
        with weight False (absent raters, images without raters) have an all-zero target, so an absent
        rater's mask is never read.
    """
    if mode == "one":
        idx, valid = choose_present_rater(present, generator)
        target = masks[torch.arange(masks.shape[0], device=masks.device), idx][:, None]
        return target * valid[:, None, None, None].to(masks.dtype), valid[:, None]
    if mode == "all":
        return masks * present[..., None, None].to(masks.dtype), present
    raise ValueError(f"rater_sampling must be 'one' or 'all', got {mode!r}")


def l2_norm_sum(modules: Iterable[nn.Module]) -> Tensor | None:
    """Sum of the (non-squared) L2 norms of every trainable parameter tensor, as the reference
    ``l2_regularisation`` of the Prob. U-Net ports. None when there is no parameter."""
    total: Tensor | None = None
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                total = p.norm(2) if total is None else total + p.norm(2)
    return total


class ConvEncoder(nn.Module):
    """Down path of the prior/posterior nets: ``len(widths)`` blocks of ``convs_per_block`` 3x3 convs + ReLU,
    2x2 average pooling (ceil mode) between blocks. ``(B, C, H, W) -> (B, widths[-1], h, w)``.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], convs_per_block: int = 3, norm: bool = False) -> None:
        super().__init__()
        chans = (in_channels, *widths)
        self.blocks = nn.ModuleList(
            conv_block(chans[i], chans[i + 1], num_convs=convs_per_block, norm=norm) for i in range(len(widths))
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He init as the reference (init_weights)
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = F.avg_pool2d(x, 2, ceil_mode=True)
            x = block(x)
        return x


class AxisAlignedConvGaussian(nn.Module):
    """Image-global axis-aligned Gaussian q(z | input) of the Prob. U-Net (prior: image; posterior: image + mask).

    ``forward(x (B, C_in, H, W)) -> (mu (B, L), logvar (B, L))``: conv encoder, spatial mean, 1x1 conv to
    ``2 L`` channels read as mean and log standard deviation (returned as a log-variance).
    """

    def __init__(self, in_channels: int, widths: Sequence[int], latent_dim: int, convs_per_block: int = 3,
                 norm: bool = False) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = ConvEncoder(in_channels, widths, convs_per_block, norm)
        self.head = nn.Conv2d(int(widths[-1]), 2 * latent_dim, 1)
        nn.init.kaiming_normal_(self.head.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x).mean(dim=(2, 3), keepdim=True)
        mu, log_sigma = self.head(h).flatten(1).chunk(2, dim=1)
        # Bound sigma to [e^-8, e^8]: an unbounded log-sigma lets exp() overflow in the KL at larger learning
        # rates (the NaN KL users of the PyTorch Prob. U-Net port report); the bound is far outside the values a
        # trained model uses, so it only removes the overflow.
        return mu, 2.0 * log_sigma.clamp(-8.0, 8.0)


class Fcomb(nn.Module):
    """The Prob. U-Net's fcomb: ``num_convs`` 1x1 convs on [features, tiled z] -> one foreground logit.

    The first conv acts on the concatenation; it is computed as ``W_f * features + W_z * z`` so that the
    features are convolved once per image and each latent sample only adds a per-channel bias (the same
    function, without materializing K copies of the tiled latent).

    ``forward(features (B, F, H, W), z (B, K, L)) -> logits (B, K, H, W)``.
    """

    def __init__(self, feat_channels: int, latent_dim: int, width: int, num_convs: int = 4) -> None:
        super().__init__()
        if num_convs < 2:
            raise ValueError(f"fcomb needs at least 2 convs (one hidden, one output), got {num_convs}")
        self.feat_channels = feat_channels
        self.first = nn.Conv2d(feat_channels + latent_dim, width, 1)
        self.hidden = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(num_convs - 2))
        self.last = nn.Conv2d(width, 1, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # orthogonal init as the reference fcomb
                nn.init.orthogonal_(m.weight)
                nn.init.normal_(m.bias, std=1e-3)

    def forward(self, features: Tensor, z: Tensor) -> Tensor:
        f = features.shape[1]
        # 1x1 convs as matmuls over a channels-last view (about twice as fast as NCHW 1x1 convs on CPU);
        # the parameters stay Conv2d-shaped.
        weight = self.first.weight[:, :, 0, 0]  # (W, F + L)
        feat = F.linear(features.permute(0, 2, 3, 1), weight[:, :f], self.first.bias)  # (B, H, W, width)
        zb = F.linear(z.to(feat.dtype), weight[:, f:])  # (B, K, width)
        x = (feat[:, None] + zb[:, :, None, None]).relu_()  # (B, K, H, W, width); in place: fresh tensors
        for conv in self.hidden:
            x = F.linear(x, conv.weight[:, :, 0, 0], conv.bias).relu_()
        return F.linear(x, self.last.weight[:, :, 0, 0], self.last.bias)[..., 0]  # (B, K, H, W)


def mask_channel_dice_loss(probs: Tensor, target: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Per-channel foreground soft Dice loss pooled over the batch, as the reference ``GeneralizedDiceLoss``
    on inputs with more than one channel (D-Persona's bound loss and its stage-2 loss).

    With several channels the reference keeps only the foreground of each channel and its inverse-squared
    volume weights cancel between numerator and denominator, so each channel c scores
    ``2 * sum_b w_bc sum_p p t / sum_b w_bc sum_p (p + t)`` (denominator clamped at ``eps`` times its weight).

    Args:
        probs: ``(B, C, *spatial)`` probabilities in [0, 1]; target: same shape, binary.
        weight: ``(B, C)`` or ``(B,)`` non-negative pair weights (0 = absent); None = 1.

    Returns:
        ``1 - mean_c dice_c`` over the channels with any weight (0 when no channel has any). A channel whose
        target and prediction are both empty scores 0 (the reference has no empty-mask rule: this is its
        behaviour), so the minimum 0 needs non-empty targets.
    """
    p = probs.flatten(2).float()
    t = target.flatten(2).to(p.dtype)
    if weight is None:
        w = torch.ones(p.shape[:2], dtype=p.dtype, device=p.device)
    else:
        w = weight.to(p.dtype)
        if w.ndim == 1:
            w = w[:, None].expand(p.shape[0], p.shape[1])
    inter = ((p * t).sum(-1) * w).sum(0)  # (C,)
    vol = (t.sum(-1) * w).sum(0)
    class_w = 1.0 / (vol * vol).clamp(min=eps)
    denom = (((p + t).sum(-1) * w).sum(0) * class_w).clamp(min=eps)
    dice = 2.0 * inter * class_w / denom
    used = (w.sum(0) > 0).to(p.dtype)
    return (used * (1.0 - dice)).sum() / used.sum().clamp(min=1.0)
