"""Building blocks shared by the Gaussian-latent baselines (Prob. U-Net, PHiSeg, D-Persona).

Everything here is vectorized over the batch and over samples. The models draw their standard-normal noise with
:func:`proseg.models._utils.noise` from an explicit ``torch.Generator`` and reparameterize it by hand
(:func:`reparameterize`; ``torch.distributions``' ``rsample`` ignores generators).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from proseg.models.backbones.unet import conv_block, down_path


def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """``mu + exp(logvar / 2) * eps`` (shapes broadcast)."""
    return mu + torch.exp(0.5 * logvar) * eps


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
        return down_path(self.blocks, x)[-1]


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
