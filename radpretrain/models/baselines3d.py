"""From-scratch segmentation baselines of published small-cohort 3D studies, found by name in `MODELS`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import BasicUNet, SegResNet
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.models.inflate import check_input
from radpretrain.registry import Registry

#: name -> model class; every class takes (spatial_dims=3, in_channels=1, out_channels=2, **options)
#: and maps (B, in_channels, *spatial) to (B, out_channels, *spatial) logits.
MODELS: Registry[type[nn.Module]] = Registry("model")


@MODELS.register("unet")
class UNet(BasicUNet):
    """A small 3D (or 2D) U-Net: MONAI's BasicUNet, four 2x max-poolings, two convs per level.

    The U-Net of Çiçek et al. 2016 at small width, the from-scratch baseline of the deep-weight-prior
    transfer study (Kuzina et al. 2019). Group norm instead of batch norm so that batches of one or two
    volumes train, and so that 1-voxel bottlenecks of 16^3 inputs are valid. Sides must be multiples of 16.

    - [0] 3D U-Net, Çiçek et al. 2016, https://arxiv.org/abs/1606.06650
    - [1] Bayesian generative models for knowledge transfer in MRI semantic segmentation problems,
      Kuzina et al. 2019, https://doi.org/10.3389/fnins.2019.00844

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels.
        features: Widths of the five encoder levels and of the last decoder level.
        dropout: Dropout probability inside the conv blocks.
    """

    multiple = 16

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        *,
        features: Sequence[int] = (16, 32, 64, 128, 256, 16),
        dropout: float = 0.0,
    ) -> None:
        _check_common(spatial_dims, in_channels, out_channels, dropout)
        if len(features) != 6 or any(not isinstance(f, int) or f < 8 or f % 8 for f in features):
            raise ConfigError(f"unet features must be 6 multiples of 8 (group norm), got {list(features)}")
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            features=tuple(features),
            norm=("group", {"num_groups": 8}),
            dropout=dropout,
        )
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_sides(x, self.spatial_dims, self.multiple, "unet")
        return super().forward(x)


@MODELS.register("meshnet")
class MeshNet(nn.Sequential):
    """MeshNet: a stack of dilated 3x3x3 convolutions at full resolution, no pooling.

    Seven conv-BN-ReLU-dropout layers with dilations 1, 1, 1, 2, 4, 8, 1 (a 37-voxel receptive field)
    and a final 1x1x1 convolution; every layer has `channels` maps (21 to 71 in the paper). Any input
    size works.

    - [0] End-to-end learning of brain tissue segmentation from imperfect labeling, Fedorov et al. 2017,
      https://arxiv.org/abs/1612.00940

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels.
        channels: Feature maps of every layer.
        dilations: Dilation of each 3x3x3 layer.
        dropout: Dropout probability after each layer.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        *,
        channels: int = 21,
        dilations: Sequence[int] = (1, 1, 1, 2, 4, 8, 1),
        dropout: float = 0.25,
    ) -> None:
        _check_common(spatial_dims, in_channels, out_channels, dropout)
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ConfigError(f"meshnet channels must be a positive integer (21 to 71 in the paper), got {channels!r}")
        if not dilations or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dilations):
            raise ConfigError(f"meshnet dilations must be positive integers, got {list(dilations)}")
        layers: list[nn.Module] = []
        previous = in_channels
        for dilation in dilations:
            # MONAI pads by `dilation` for a 3-wide kernel, so every layer keeps the input size.
            layers.append(
                Convolution(
                    spatial_dims,
                    previous,
                    channels,
                    kernel_size=3,
                    dilation=dilation,
                    adn_ordering="NAD",
                    norm="batch",
                    act="relu",
                    dropout=dropout or None,
                )
            )
            previous = channels
        layers.append(Convolution(spatial_dims, channels, out_channels, kernel_size=1, conv_only=True))
        super().__init__(*layers)
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_sides(x, self.spatial_dims, 1, "meshnet")
        return super().forward(x)


@MODELS.register("resunet")
class ResUNet(SegResNet):
    """A residual U-Net of pre-activation ResNet blocks: MONAI's SegResNet without the VAE branch.

    The BraTS 2018 winner's encoder-decoder (norm-ReLU-conv twice plus identity in every block, group
    norm, 1-2-2-4 blocks down, one block per level up, additive skips). Sides must be multiples of 8.

    - [0] 3D MRI brain tumor segmentation using autoencoder regularization, Myronenko 2018,
      https://arxiv.org/abs/1810.11654
    - [1] Identity Mappings in Deep Residual Networks, He et al. 2016, https://arxiv.org/abs/1603.05027

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels.
        init_filters: Width of the first level (doubled at each of the three downsamplings).
        dropout: Dropout probability after the first convolution.
    """

    multiple = 8

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        *,
        init_filters: int = 16,
        dropout: float = 0.0,
    ) -> None:
        _check_common(spatial_dims, in_channels, out_channels, dropout)
        if isinstance(init_filters, bool) or not isinstance(init_filters, int) or init_filters < 8 or init_filters % 8:
            raise ConfigError(f"resunet init_filters must be a multiple of 8 (group norm), got {init_filters!r}")
        super().__init__(
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=out_channels,
            dropout_prob=dropout or None,
            norm=("group", {"num_groups": 8}),
            blocks_down=(1, 2, 2, 4),
            blocks_up=(1, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_sides(x, self.spatial_dims, self.multiple, "resunet")
        return super().forward(x)


def _check_common(spatial_dims: int, in_channels: int, out_channels: int, dropout: float) -> None:
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")


def _check_sides(x: torch.Tensor, spatial_dims: int, multiple: int, name: str) -> None:
    check_input(nn.Identity(), x, spatial_dims, min_side=1)
    sides = tuple(int(s) for s in x.shape[2:])
    if any(side % multiple for side in sides):
        raise ConfigError(f"{name} needs sides that are multiples of {multiple}, got {sides}; change the size")
