"""Backbones: headless networks mapping ``(B, C, H, W)`` images to ``(B, F, H, W)`` full-resolution features.

Every backbone exposes ``out_channels`` (F). Build one with :func:`create_backbone`.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from proseg.models.backbones.resnet_unet import ResNet34UNet
from proseg.models.backbones.unet import UNet
from proseg.models.registry import UnknownNameError  # a ConfigError that is still a KeyError


def create_backbone(name: str, in_channels: int, **cfg: Any) -> nn.Module:
    """``unet`` (plain U-Net, ``widths=...``) or ``resnet34_unet`` (smp ``Unet("resnet34")`` architecture)."""
    if name == "unet":
        return UNet(in_channels, **cfg)
    if name == "resnet34_unet":
        return ResNet34UNet(in_channels, **cfg)
    raise UnknownNameError(f"unknown backbone {name!r}; available: unet, resnet34_unet")


__all__ = ["ResNet34UNet", "UNet", "create_backbone"]
