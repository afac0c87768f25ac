"""Backbones: plain U-Net and the smp-equivalent ResNet-34 U-Net (shapes, parameter counts, local pretrained load)."""

from __future__ import annotations

import pytest
import torch

from proseg.errors import ConfigError
from proseg.models.backbones import UNet, create_backbone
from proseg.models.backbones.resnet_unet import (
    ResNet34Encoder,
    ResNet34UNet,
    adapt_first_conv,
    load_pretrained_encoder,
)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def r34() -> ResNet34UNet:
    torch.manual_seed(0)
    return create_backbone("resnet34_unet", 3).eval()


def test_resnet34_unet_parameter_count_matches_smp(r34: ResNet34UNet) -> None:
    # smp Unet("resnet34", in_channels=3, classes=1) has 24,436,369 parameters, of which its 3x3 segmentation
    # head (16 -> 1) holds 16*9 + 1 = 145; the encoder alone is torchvision's ResNet-34 minus fc (21,284,672).
    assert n_params(r34) + 16 * 9 + 1 == 24_436_369
    assert n_params(r34.encoder) == 21_797_672 - 513_000
    assert n_params(create_backbone("resnet34_unet", 1)) == 24_436_224 - 64 * 2 * 49


def test_resnet34_unet_shapes(r34: ResNet34UNet) -> None:
    assert r34.out_channels == 16
    with torch.no_grad():
        feats = r34.encoder(torch.zeros(1, 3, 64, 64))
        assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4),
                                                       (512, 2, 2)]
        assert tuple(r34(torch.randn(2, 3, 32, 32)).shape) == (2, 16, 32, 32)
        assert tuple(r34(torch.randn(1, 3, 20, 36)).shape) == (1, 16, 20, 36)  # padded to 32x64 and cropped
        five = create_backbone("resnet34_unet", 5).eval()
        assert tuple(five(torch.randn(1, 5, 32, 32)).shape) == (1, 16, 32, 32)


def test_resnet34_unet_decoder_block_structure(r34: ResNet34UNet) -> None:
    # (in + skip -> out) per block, as smp with decoder_channels (256, 128, 64, 32, 16)
    shapes = [tuple(b.conv1[0].weight.shape[:2]) for b in r34.decoder.blocks]
    assert shapes == [(256, 512 + 256), (128, 256 + 128), (64, 128 + 64), (32, 64 + 64), (16, 32)]


@pytest.fixture(scope="module")
def fake_torchvision(tmp_path_factory) -> tuple[dict[str, torch.Tensor], object]:
    """A torchvision-named ResNet-34 state dict (old style: with ``fc.*``, without ``num_batches_tracked``)."""
    torch.manual_seed(1)
    enc = ResNet34Encoder(3)
    state = {k: v for k, v in enc.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["layer2.0.downsample.1.running_var"] = torch.rand(128) + 0.5
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    path = tmp_path_factory.mktemp("weights") / "resnet34.pth"
    torch.save(state, path)
    return state, path


@pytest.mark.parametrize("in_channels", [1, 3, 5])
def test_pretrained_torchvision_state_dict_loads_into_the_encoder(fake_torchvision, in_channels: int) -> None:
    state, path = fake_torchvision
    torch.manual_seed(2)
    model = ResNet34UNet(in_channels, pretrained=path)
    enc = model.encoder.state_dict()
    torch.testing.assert_close(enc["layer3.4.conv2.weight"], state["layer3.4.conv2.weight"])
    torch.testing.assert_close(enc["layer2.0.downsample.1.running_var"], state["layer2.0.downsample.1.running_var"])
    w = state["conv1.weight"]
    if in_channels == 1:
        expected = w.sum(1, keepdim=True)
    elif in_channels == 3:
        expected = w
    else:  # channel i copies RGB channel i % 3, scaled by 3/5
        expected = torch.cat([w, w[:, :2]], 1) * (3 / 5)
    torch.testing.assert_close(enc["conv1.weight"], expected)


def test_pretrained_prefixed_and_safetensors(fake_torchvision, tmp_path) -> None:
    from safetensors.torch import save_file

    state, _ = fake_torchvision
    path = tmp_path / "r34.safetensors"
    save_file({"module." + k: v.contiguous() for k, v in state.items()}, str(path))
    model = create_backbone("resnet34_unet", 3, pretrained=str(path))
    torch.testing.assert_close(model.encoder.state_dict()["layer4.2.bn2.weight"], state["layer4.2.bn2.weight"])


def test_pretrained_rejects_unexpected_and_missing_keys(tmp_path) -> None:
    enc = ResNet34Encoder(1)
    state = dict(enc.state_dict())
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"bad.pth.*unexpected keys.*layer5"):
        load_pretrained_encoder(enc, bad)
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(ValueError, match="missing keys"):
        load_pretrained_encoder(enc, bad)
    torch.save({"just": "text"}, bad)
    with pytest.raises(ValueError, match="not a state dict"):
        load_pretrained_encoder(enc, bad)
    with pytest.raises(FileNotFoundError):
        load_pretrained_encoder(enc, tmp_path / "nope.pth")


def test_adapt_first_conv_golden() -> None:
    w = torch.arange(2 * 3 * 1 * 1, dtype=torch.float32).reshape(2, 3, 1, 1)  # [[0,1,2],[3,4,5]]
    assert adapt_first_conv(w, 1).flatten().tolist() == [3.0, 12.0]
    assert adapt_first_conv(w, 6)[0].flatten().tolist() == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]


def test_unet_backbone_shapes_and_widths() -> None:
    net = create_backbone("unet", 2, widths=(8, 16, 32))
    assert isinstance(net, UNet) and net.out_channels == 8
    assert tuple(net(torch.randn(2, 2, 20, 28)).shape) == (2, 8, 20, 28)
    with pytest.raises(ConfigError, match="unknown backbone 'vgg'"):
        create_backbone("vgg", 1)
