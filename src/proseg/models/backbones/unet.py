"""The plain U-Net of the Probabilistic U-Net / PHiSeg papers, with configurable widths."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def conv_block(cin: int, cout: int, num_convs: int = 2, norm: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers.append(nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=not norm))
        if norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def down_path(blocks: Iterable[nn.Module], x: Tensor) -> list[Tensor]:
    """Run ``blocks`` in order with 2x2 average pooling (ceil mode) between them; every block's output, finest
    first (the down path of the U-Net, of PHiSeg's and the Prob. U-Net's encoders, of D-Persona's heads)."""
    feats = []
    for i, block in enumerate(blocks):
        if i > 0:
            x = F.avg_pool2d(x, 2, ceil_mode=True)
        x = block(x)
        feats.append(x)
    return feats


class UNetEncoder(nn.Module):
    """Down path: a conv block per level, 2x2 average pooling between levels.

    ``forward`` returns the list of level outputs, finest first: ``[(B, w0, H, W), (B, w1, H/2, W/2), ...]``.
    """

    def __init__(self, in_channels: int, widths: Sequence[int] = (32, 64, 128, 192), norm: bool = True) -> None:
        super().__init__()
        self.widths = tuple(widths)
        chans = (in_channels, *self.widths)
        self.blocks = nn.ModuleList(conv_block(chans[i], chans[i + 1], norm=norm) for i in range(len(self.widths)))

    def forward(self, x: Tensor) -> list[Tensor]:
        return down_path(self.blocks, x)


class UNetDecoder(nn.Module):
    """Up path: bilinear upsampling, concatenation with the skip, a conv block. Output at full resolution."""

    def __init__(self, widths: Sequence[int], norm: bool = True) -> None:
        super().__init__()
        widths = tuple(widths)
        self.blocks = nn.ModuleList(
            conv_block(widths[i + 1] + widths[i], widths[i], norm=norm) for i in reversed(range(len(widths) - 1))
        )

    def forward(self, feats: list[Tensor]) -> Tensor:
        x = feats[-1]
        for block, skip in zip(self.blocks, reversed(feats[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return x


class UNet(nn.Module):
    """Headless U-Net: ``(B, C, H, W) -> (B, widths[0], H, W)`` features (no output head).

    Args:
        in_channels: image channels C.
        widths: channels per level, finest first (the Prob. U-Net uses (32, 64, 128, 192)).
        norm: BatchNorm after every conv (the original Prob. U-Net has none; it trains faster with it).
    """

    def __init__(self, in_channels: int, widths: Sequence[int] = (32, 64, 128, 192), norm: bool = True) -> None:
        super().__init__()
        self.encoder = UNetEncoder(in_channels, widths, norm=norm)
        self.decoder = UNetDecoder(widths, norm=norm)
        self.out_channels = int(widths[0])

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))
