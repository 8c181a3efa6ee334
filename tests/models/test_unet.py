"""U-Net decoders over timm feature pyramids: shapes in 2D and 3D, gradients, refusals."""

from __future__ import annotations

import pytest
import torch

from radpretrain.errors import ConfigError
from radpretrain.models.encoders import build_encoder
from radpretrain.models.inflate import inflate
from radpretrain.models.unet import SegmentationModel, default_widths

TINY = (16, 16, 8, 8, 8)


def _encoder(name: str, spatial_dims: int, size: int) -> torch.nn.Module:
    encoder = build_encoder(name, img_size=size) if "vit" in name else build_encoder(name)
    return inflate(encoder, "centre") if spatial_dims == 3 else encoder


@pytest.mark.parametrize(
    ("name", "spatial_dims", "size"),
    [
        ("test_resnet", 2, 32),
        ("test_resnet", 2, 45),  # odd sizes: every level is resized to its skip
        ("cbr_small", 2, 32),
        ("test_vit", 2, 32),
        ("test_resnet", 3, 32),
        ("cbr_small", 3, 16),
    ],
)
def test_output_has_input_resolution_and_gradients_reach_the_encoder(name: str, spatial_dims: int, size: int) -> None:
    torch.manual_seed(0)
    encoder = _encoder(name, spatial_dims, size)
    levels = 4 if name != "test_resnet" else 5
    model = SegmentationModel(encoder, 3, spatial_dims, decoder_channels=TINY[-levels:])
    assert model.encoder is encoder
    assert model.levels == levels
    x = torch.randn(2, 1, *([size] * spatial_dims))
    out = model(x)
    assert out.shape == (2, 3, *([size] * spatial_dims))
    out.square().mean().backward()
    first = next(p for p in encoder.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.head.parameters())


def test_vit_intermediates_are_spread_into_a_pyramid_like_unetr() -> None:
    model = SegmentationModel(build_encoder("test_vit", img_size=32), 1, 2, decoder_channels=(16, 16, 8, 8))
    depth = len(model.encoder.blocks)
    assert model.indices == [(i + 1) * depth // 4 - 1 for i in range(4)]
    features = model.encoder.forward_intermediates(
        torch.randn(1, 1, 32, 32), indices=model.indices, intermediates_only=True
    )
    sides = [up(f).shape[-1] for up, f in zip(model.pyramid, features, strict=True)]
    assert sides == [16, 8, 4, 2]  # reductions 2, 4, 8, 16 from one reduction-16 grid


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_other_decoder_norms_build_and_run(norm: str) -> None:
    model = SegmentationModel(build_encoder("cbr_small"), 2, 2, decoder_channels=(16, 8, 8, 8), norm=norm)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 2, 32, 32)


def test_default_widths_halve_from_256() -> None:
    assert default_widths(5) == [256, 128, 64, 32, 16]
    assert default_widths(4) == [128, 64, 32, 16]
    assert default_widths(7)[:2] == [256, 256]


def test_bad_arguments_and_inputs_are_refused_with_a_way_out() -> None:
    encoder = build_encoder("test_resnet")
    with pytest.raises(ConfigError, match=r"got a 2D encoder \(inflate it first"):
        SegmentationModel(encoder, 1, 3)
    with pytest.raises(ConfigError, match="spatial_dims must be 2 or 3"):
        SegmentationModel(encoder, 1, 1)
    with pytest.raises(ConfigError, match="out_channels must be a positive integer"):
        SegmentationModel(encoder, 0, 2)
    with pytest.raises(ConfigError, match="decoder_channels must hold 5 positive integers"):
        SegmentationModel(encoder, 1, 2, decoder_channels=(8, 8))
    with pytest.raises(ConfigError, match="norm must be one of"):
        SegmentationModel(encoder, 1, 2, norm="layer")
    model = SegmentationModel(encoder, 1, 2, decoder_channels=TINY)
    with pytest.raises(ConfigError, match=r"takes \(B, C, H, W\) batches"):
        model(torch.randn(1, 1, 8, 32, 32))
    with pytest.raises(ConfigError, match="every side must be at least 32"):
        model(torch.randn(1, 1, 16, 64))
    fixed = build_encoder("test_vit", img_size=32, dynamic_img_size=False)
    vit = SegmentationModel(fixed, 1, 2, decoder_channels=(8, 8, 8, 8))
    with pytest.raises(ConfigError, match="takes 32x32 inputs, got 64x64"):
        vit(torch.randn(1, 1, 64, 64))
    # A ViT built with a dynamic size takes other sizes (timm resamples the position embedding).
    dynamic = SegmentationModel(build_encoder("test_vit", img_size=32), 1, 2, decoder_channels=(8, 8, 8, 8))
    assert dynamic(torch.randn(1, 1, 64, 64)).shape == (1, 1, 64, 64)
