"""2D -> 3D inflation: centre inflation reproduces the 2D encoder slice by slice; other layers are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.models.encoders import ENCODERS, build_encoder
from radpretrain.models.inflate import GlobalPool3d, inflate, inflate_kernel, spatial_dims_of

TWO_D_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@pytest.mark.parametrize("name", ["test_resnet", "cbr_small"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_centre_inflation_reproduces_2d_encoder_on_constant_depth(name: str, mode: str) -> None:
    torch.manual_seed(0)
    encoder2d = build_encoder(name)
    # Non-trivial running statistics, so that eval mode is not the identity normalisation.
    encoder2d.train()
    with torch.no_grad():
        encoder2d(torch.randn(4, 1, 32, 32) * 2 + 1)
    encoder3d = inflate(encoder2d, "centre")
    getattr(encoder2d, mode)()
    getattr(encoder3d, mode)()

    image = torch.randn(2, 1, 32, 32)
    volume = image[:, :, None].expand(2, 1, 32, 32, 32).contiguous()
    with torch.no_grad():
        maps2d = encoder2d.forward_intermediates(image, intermediates_only=True)
        maps3d = encoder3d.forward_intermediates(volume, intermediates_only=True)
        pooled2d, pooled3d = encoder2d(image), encoder3d(volume)

    assert len(maps3d) == len(maps2d) == len(encoder2d.feature_info)
    for map2d, map3d in zip(maps2d, maps3d, strict=True):
        # Isotropic rule: depth is reduced like height.
        assert map3d.shape == (*map2d.shape[:2], map2d.shape[2], *map2d.shape[2:])
        for depth in range(map3d.shape[2]):
            torch.testing.assert_close(map3d[:, :, depth], map2d, atol=1e-4, rtol=1e-4)
    assert pooled3d.shape == pooled2d.shape == (2, encoder2d.num_features)
    torch.testing.assert_close(pooled3d, pooled2d, atol=1e-4, rtol=1e-4)


def test_inflation_leaves_the_2d_encoder_alone_and_keeps_frozen_parameters_frozen() -> None:
    encoder2d = build_encoder("test_resnet")
    encoder2d.conv1[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in encoder2d.state_dict().items()}
    encoder3d = inflate(encoder2d, "average", depth_kernel=5)

    assert spatial_dims_of(encoder2d) == 2 and spatial_dims_of(encoder3d) == 3
    for key, value in encoder2d.state_dict().items():
        assert torch.equal(value, before[key])
    assert not any(isinstance(m, TWO_D_LAYERS) for m in encoder3d.modules())
    assert encoder3d.conv1[0].weight.shape == (16, 1, 5, 3, 3)
    assert not encoder3d.conv1[0].weight.requires_grad
    assert encoder3d.layer1[0].conv1.weight.requires_grad
    assert encoder3d.radpretrain_inflation == {"method": "average", "depth_kernel": 5}
    # Same parameter names (strategies and stages address them by name), 1x1 convs stay 1x1x1.
    assert list(encoder3d.state_dict()) == list(encoder2d.state_dict())
    assert encoder3d.layer2[0].downsample[1].weight.shape[2:] == (1, 1, 1)
    torch.testing.assert_close(encoder3d.bn1.running_var, encoder2d.bn1.running_var)


@pytest.mark.parametrize("method", ["centre", "average"])
def test_inflated_kernels_sum_to_the_2d_kernel(method: str) -> None:
    weight = torch.randn(4, 3, 3, 3)
    inflated = inflate_kernel(weight, 3, method)
    assert inflated.shape == (4, 3, 3, 3, 3)
    torch.testing.assert_close(inflated.sum(2), weight)
    if method == "centre":
        assert torch.equal(inflated[:, :, 1], weight)
        assert not inflated[:, :, [0, 2]].any()
    else:
        for depth in range(3):
            torch.testing.assert_close(inflated[:, :, depth], weight / 3)


def test_average_inflation_matches_2d_conv_away_from_the_depth_border() -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1))
    inflated = inflate(layer, "average", depth_kernel=3)
    image = torch.randn(1, 1, 16, 16)
    volume = image[:, :, None].expand(1, 1, 9, 16, 16)
    with torch.no_grad():
        out2d, out3d = layer(image), inflated(volume)
    assert out3d.shape == (1, 4, 5, 8, 8)
    for depth in (1, 2, 3):  # interior output slices: their 3-deep window holds no padding
        torch.testing.assert_close(out3d[:, :, depth], out2d, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out3d[:, :, 0], out2d, atol=1e-3)  # the zero-padded border differs


@pytest.mark.parametrize("name", ENCODERS)
def test_every_documented_encoder_inflates_or_is_refused_clearly(name: str) -> None:
    encoder2d = build_encoder(name, img_size=32) if "vit" in name else build_encoder(name)
    if "vit" in name:
        with pytest.raises(ConfigError, match=r"cannot inflate layer 'patch_embed' \(PatchEmbed\): vision"):
            inflate(encoder2d)
        return
    encoder3d = inflate(encoder2d)
    assert not any(isinstance(m, TWO_D_LAYERS) for m in encoder3d.modules())
    if name.startswith("test_") or name == "cbr_small":
        with torch.no_grad():
            assert encoder3d.eval()(torch.randn(1, 1, 32, 32, 32)).shape == (1, encoder2d.num_features)


def test_unknown_layers_and_bad_arguments_are_refused() -> None:
    encoder = build_encoder("test_resnet")
    with pytest.raises(ConfigError, match="Did you mean 'centre'"):
        inflate(encoder, "center")
    with pytest.raises(ConfigError, match="depth_kernel must be an odd integer"):
        inflate(encoder, "centre", depth_kernel=2)
    with pytest.raises(ConfigError, match="already 3D"):
        inflate(inflate(encoder))
    with pytest.raises(ConfigError, match=r"layer '0' \(Conv2dSame\).*'same' padding"):
        from timm.layers import Conv2dSame

        inflate(nn.Sequential(Conv2dSame(1, 4, 3, stride=2)))

    class Custom(nn.Module):  # a forward nobody checked for 3D input
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean((2, 3))

    with pytest.raises(ConfigError, match=r"cannot inflate the encoder \(Custom\): its forward is not known"):
        inflate(Custom())
    with pytest.raises(ConfigError, match="no 2D or 3D convolution"):
        inflate(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize(
    ("pool_type", "expected"),
    [("avg", lambda x: x.mean((2, 3, 4))), ("max", lambda x: x.amax((2, 3, 4))), ("catavgmax", None)],
)
def test_global_pool_3d_pools_depth_height_and_width(pool_type: str, expected: object) -> None:
    x = torch.randn(2, 3, 4, 5, 6)
    out = GlobalPool3d(pool_type, flatten=True)(x)
    if expected is None:
        assert out.shape == (2, 6)
        torch.testing.assert_close(out, torch.cat([x.mean((2, 3, 4)), x.amax((2, 3, 4))], 1))
    else:
        torch.testing.assert_close(out, expected(x))  # type: ignore[operator]
    assert GlobalPool3d("fastavg", flatten=False)(x).shape == (2, 3, 1, 1, 1)
    with pytest.raises(ConfigError, match="cannot be inflated"):
        GlobalPool3d("lse")
