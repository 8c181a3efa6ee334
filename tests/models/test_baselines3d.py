"""From-scratch baselines: every registered model in 2D and 3D, MeshNet's receptive field, refusals."""

from __future__ import annotations

import pytest
import torch

from radpretrain.errors import ConfigError
from radpretrain.models.baselines3d import MODELS, MeshNet

SMALL = {"unet": {"features": (8, 8, 16, 16, 32, 8)}, "meshnet": {"channels": 8}, "resunet": {"init_filters": 8}}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_maps_inputs_to_logits_of_the_same_size(name: str, spatial_dims: int) -> None:
    torch.manual_seed(0)
    model = MODELS.get(name)(spatial_dims=spatial_dims, in_channels=2, out_channels=3, **SMALL.get(name, {}))
    x = torch.randn(2, 2, *([16] * spatial_dims))
    out = model(x)
    assert out.shape == (2, 3, *([16] * spatial_dims))
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_meshnet_is_seven_dilated_layers_with_a_37_pixel_receptive_field() -> None:
    model = MeshNet(spatial_dims=2, out_channels=1, channels=4, dropout=0.0).eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.dilation[0] for c in convs] == [1, 1, 1, 2, 4, 8, 1, 1]
    assert [c.kernel_size[0] for c in convs] == [3] * 7 + [1]
    x = torch.randn(1, 1, 64, 64, requires_grad=True)
    model(x)[0, 0, 32, 32].backward()
    rows = x.grad[0, 0].abs().sum(1).nonzero().flatten()
    assert (rows.min().item(), rows.max().item()) == (32 - 18, 32 + 18)


def test_bad_arguments_and_sizes_are_refused() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'meshnet'"):
        MODELS.get("meshnt")
    with pytest.raises(ConfigError, match="spatial_dims must be 2 or 3"):
        MODELS.get("unet")(spatial_dims=4)
    with pytest.raises(ConfigError, match="out_channels must be a positive integer"):
        MODELS.get("resunet")(out_channels=0)
    with pytest.raises(ConfigError, match="channels must be a positive integer"):
        MeshNet(channels=0)
    with pytest.raises(ConfigError, match="features must be 6 multiples of 8"):
        MODELS.get("unet")(features=(8, 8, 8))
    with pytest.raises(ConfigError, match="multiples of 16"):
        MODELS.get("unet")(**SMALL["unet"])(torch.randn(1, 1, 24, 16, 16))
    with pytest.raises(ConfigError, match="multiples of 8"):
        MODELS.get("resunet")(spatial_dims=2, init_filters=8)(torch.randn(1, 1, 12, 16))
    with pytest.raises(ConfigError, match=r"takes \(B, C, D, H, W\) batches"):
        MeshNet(channels=4)(torch.randn(1, 1, 16, 16))
