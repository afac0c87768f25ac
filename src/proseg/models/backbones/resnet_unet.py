"""ResNet-34 U-Net: the architecture of segmentation_models_pytorch ``Unet("resnet34")``, headless.

Encoder: torchvision's ResNet-34 without ``avgpool``/``fc`` (stem conv 7x7/2 + BN + ReLU, max-pool 3x3/2, four
stages of BasicBlocks ``[3, 4, 6, 3]`` with widths 64/128/256/512). Decoder: smp's U-Net decoder with
``decoder_channels=(256, 128, 64, 32, 16)``: five blocks, each ``nearest 2x upsample -> concat skip ->
(conv3x3-BN-ReLU) x 2``; the skips are the stage outputs at 1/16, 1/8, 1/4 and 1/2 resolution, the last block has
no skip. The output is the 16-channel full-resolution feature map (smp's segmentation head is not part of it).

Parameter names of the encoder follow torchvision/timm (``encoder.conv1.weight``, ``encoder.layer1.0.bn1...``), so
a local ImageNet state dict loads with a plain prefix change (:func:`load_pretrained_encoder`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

RESNET34_LAYERS = (3, 4, 6, 3)
RESNET34_WIDTHS = (64, 128, 256, 512)
SMP_DECODER_CHANNELS = (256, 128, 64, 32, 16)


class BasicBlock(nn.Module):
    """torchvision ``BasicBlock``: conv3x3-BN-ReLU-conv3x3-BN (+ projection shortcut), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet34Encoder(nn.Module):
    """ResNet-34 feature pyramid. ``forward`` returns ``[x1 (64, H/2), x2 (64, H/4), x3 (128, H/8), x4 (256, H/16),
    x5 (512, H/32)]`` (the input itself, smp's first "feature", is not returned: the decoder drops it anyway)."""

    out_channels = (64, *RESNET34_WIDTHS)

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, (n, w) in enumerate(zip(RESNET34_LAYERS, RESNET34_WIDTHS, strict=True)):
            blocks = [BasicBlock(cin, w, stride=1 if i == 0 else 2)] + [BasicBlock(w, w) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = w
        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        x1 = self.relu(self.bn1(self.conv1(x)))
        x2 = self.layer1(self.maxpool(x1))
        x3 = self.layer2(x2)
        x4 = self.layer3(x3)
        x5 = self.layer4(x4)
        return [x1, x2, x3, x4, x5]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    # smp Conv2dReLU with use_batchnorm=True: the conv has no bias.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """smp ``DecoderBlock``: nearest 2x upsampling, concatenation with the skip, two conv-BN-ReLU."""

    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(cin + skip, cout)
        self.conv2 = _conv_bn_relu(cout, cout)

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UnetDecoder(nn.Module):
    """smp ``UnetDecoder`` (no center block, no attention) over the ResNet-34 pyramid."""

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int] = SMP_DECODER_CHANNELS) -> None:
        super().__init__()
        enc = list(encoder_channels)[::-1]  # deepest first: 512, 256, 128, 64, 64
        head, skips = enc[0], [*enc[1:], 0]
        ins = [head, *decoder_channels[:-1]]
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o) for i, s, o in zip(ins, skips[: len(decoder_channels)], decoder_channels, strict=True)
        )
        for m in self.modules():  # smp initialize_decoder
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> Tensor:
        rev = feats[::-1]
        x, skips = rev[0], rev[1:]
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
        return x


class ResNet34UNet(nn.Module):
    """Headless smp ``Unet("resnet34")``: ``(B, C, H, W) -> (B, 16, H, W)`` features.

    Args:
        in_channels: image channels C (any C >= 1).
        decoder_channels: smp's default ``(256, 128, 64, 32, 16)``; ``out_channels`` is the last entry.
        pretrained: optional path to a local torchvision/timm ResNet-34 state dict (``.pth``/``.pt`` loaded with
            ``weights_only=True``, or ``.safetensors``) loaded into the encoder; see :func:`load_pretrained_encoder`.

    Inputs whose H or W is not a multiple of 32 (the encoder's stride) are zero-padded at the bottom/right to
    the next multiple and the output is cropped back, so any size works (smp raises instead).
    """

    stride = 32

    def __init__(
        self,
        in_channels: int,
        decoder_channels: Sequence[int] = SMP_DECODER_CHANNELS,
        pretrained: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels must have 5 entries (one per stage), got {tuple(decoder_channels)}")
        self.in_channels = in_channels
        self.encoder = ResNet34Encoder(in_channels)
        self.decoder = UnetDecoder(ResNet34Encoder.out_channels, tuple(decoder_channels))
        self.out_channels = int(decoder_channels[-1])
        if pretrained is not None:
            load_pretrained_encoder(self.encoder, pretrained)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        out = self.decoder(self.encoder(x))
        return out[..., :h, :w] if (ph or pw) else out


# --- pretrained weights ----------------------------------------------------------------------------------------
_STRIP_PREFIXES = ("module.", "model.", "encoder.", "backbone.")
_IGNORED_PREFIXES = ("fc.",)  # the classifier of torchvision/timm ResNet-34


def adapt_first_conv(weight: Tensor, in_channels: int) -> Tensor:
    """smp ``patch_first_conv`` for a pretrained stem ``(64, 3, 7, 7)``: C=1 sums the RGB filters; other C repeat
    them cyclically (channel i takes RGB channel i % 3) and scale by 3 / C so the response keeps its magnitude."""
    cin = weight.shape[1]
    if in_channels == cin:
        return weight
    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    idx = torch.arange(in_channels) % cin
    return weight[:, idx] * (cin / in_channels)


def _read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: pretrained ResNet-34 weights not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors (got {type(obj).__name__})")
    return dict(obj)


def load_pretrained_encoder(encoder: ResNet34Encoder, path: str | os.PathLike[str]) -> None:
    """Load a local torchvision/timm ResNet-34 state dict into ``encoder`` (no download ever happens).

    Key names: torchvision and timm both use ``conv1``, ``bn1``, ``layerN.M.{conv,bn}{1,2}``,
    ``layerN.0.downsample.{0,1}``;
    a leading ``module.``/``model.``/``encoder.``/``backbone.`` is stripped and the ``fc.*`` classifier ignored.
    ``conv1`` is adapted to the encoder's input channels with :func:`adapt_first_conv`. Any other key that the
    encoder does not have, a missing key, or a shape mismatch raises ``ValueError`` naming the file.
    """
    raw = _read_state_dict(path)
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        k = key
        for p in _STRIP_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        if k.startswith(_IGNORED_PREFIXES):
            continue
        state[k] = value
    if "conv1.weight" in state:
        state["conv1.weight"] = adapt_first_conv(state["conv1.weight"], encoder.conv1.in_channels)
    own = encoder.state_dict()
    for k in own:  # old torchvision checkpoints predate BatchNorm's counter
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unexpected or missing:
        raise ValueError(f"{os.fspath(path)}: not a ResNet-34 state dict (unexpected keys: {unexpected[:5]}, "
                         f"missing keys: {missing[:5]})")
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{os.fspath(path)}: shape mismatch (key, file, model): {bad[:5]}")
    encoder.load_state_dict(state, strict=True)
