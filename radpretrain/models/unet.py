"""U-Net decoders over an encoder's feature pyramid, one code path for 2D images and inflated 3D volumes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock, UnetOutBlock, UnetrPrUpBlock
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.models.inflate import check_input, spatial_dims_of

NORMS = ("group", "instance", "batch")

#: Most levels a single-scale (ViT) encoder is spread over, as in UNETR (reductions r/8, r/4, r/2, r).
VIT_LEVELS = 4


class SegmentationModel(nn.Module):
    """An encoder with a U-Net decoder: (B, C, *spatial) -> (B, out_channels, *spatial) logits.

    The decoder takes the encoder's feature pyramid from timm's `forward_intermediates` (input side
    first), starts at the deepest map and, level by level, resizes to the next skip's size (nearest),
    concatenates it and applies two conv-norm-LeakyReLU layers (MONAI's `UnetBasicBlock`). The last skip
    is a conv block on the input itself, so the output has the input's resolution even when the first
    encoder map is already reduced. Resizing to the skip's size (rather than a fixed x2) makes any
    input size work, including odd sizes and depths that the encoder reduces to 1.

    Encoders whose intermediates all share one resolution (ViTs) are spread into a pyramid as UNETR
    does: `VIT_LEVELS` evenly spaced blocks, upsampled x8, x4, x2, x1 by transposed convolutions
    (MONAI's `UnetrPrUpBlock`).

    - [0] U-Net, Ronneberger et al. 2015, https://arxiv.org/abs/1505.04597
    - [1] UNETR, Hatamizadeh et al. 2022, https://arxiv.org/abs/2103.10504

    Args:
        encoder: A timm encoder with `feature_info` and `forward_intermediates`, 2D for spatial_dims=2
            or inflated (`radpretrain.models.inflate.inflate`) for spatial_dims=3. Kept as `.encoder`.
        out_channels: Output channels (1 for a binary mask with a sigmoid, K for K classes).
        spatial_dims: 2 (images) or 3 (volumes).
        decoder_channels: Width of each decoder level, deepest first, one per level (`levels`);
            default 16 * 2**k capped at 256 (e.g. 256, 128, 64, 32, 16 for a ResNet).
        norm: Decoder normalisation: "group" (8 groups; works for any batch size and for 1-voxel maps),
            "instance" or "batch".
    """

    def __init__(
        self,
        encoder: nn.Module,
        out_channels: int,
        spatial_dims: int = 2,
        *,
        decoder_channels: Sequence[int] | None = None,
        norm: str = "group",
    ) -> None:
        super().__init__()
        _check_positive("out_channels", out_channels)
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if norm not in NORMS:
            raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        found = spatial_dims_of(encoder)
        if found != spatial_dims:
            hint = " (inflate it first: radpretrain.models.inflate.inflate(encoder, 'centre'))" if found == 2 else ""
            raise ConfigError(f"SegmentationModel(spatial_dims={spatial_dims}) got a {found}D encoder{hint}")
        if not callable(getattr(encoder, "forward_intermediates", None)):
            raise ConfigError(f"{type(encoder).__name__} has no forward_intermediates; use a timm encoder")
        self.encoder = encoder
        self.spatial_dims = spatial_dims
        self.out_channels = out_channels

        channels, reductions = _pyramid(encoder)
        single_scale = len(set(reductions)) == 1 and len(reductions) > 1
        if single_scale:
            count, reduction = len(reductions), reductions[0]
            levels = max(1, min(VIT_LEVELS, count, int(math.log2(reduction)) + 1))
            self.indices: list[int] = [(i + 1) * count // levels - 1 for i in range(levels)]
            channels = [channels[i] for i in self.indices]
        else:
            levels = len(reductions)
            self.indices = list(range(levels))
        self.levels = levels
        self.min_side = max(reductions)
        widths = list(decoder_channels) if decoder_channels is not None else default_widths(levels)
        if len(widths) != levels or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ConfigError(
                f"decoder_channels must hold {levels} positive integers for this encoder (one per level, "
                f"deepest first), got {decoder_channels!r}"
            )

        # Level j (input side first) feeds decoder block levels-2-j; a single-scale map is first brought
        # to its level's resolution with that block's width.
        pyramid: list[nn.Module] = []
        skip_channels: list[int] = []
        for j, chs in enumerate(channels):
            factor = 2 ** (levels - 1 - j) if single_scale else 1
            if factor == 1:
                pyramid.append(nn.Identity())
                skip_channels.append(chs)
                continue
            width = widths[levels - 2 - j]
            pyramid.append(
                UnetrPrUpBlock(
                    spatial_dims,
                    chs,
                    width,
                    num_layer=int(math.log2(factor)) - 1,
                    kernel_size=3,
                    stride=1,
                    upsample_kernel_size=2,
                    norm_name=norm_spec(norm, width),
                    conv_block=True,
                    res_block=True,
                )
            )
            skip_channels.append(width)
        self.pyramid = nn.ModuleList(pyramid)
        in_chans = _in_channels(encoder)
        self.stem = UnetBasicBlock(spatial_dims, in_chans, widths[-1], 3, 1, norm_spec(norm, widths[-1]))
        blocks = []
        previous = skip_channels[-1]
        for i in range(levels):
            skip = skip_channels[levels - 2 - i] if i < levels - 1 else widths[-1]
            blocks.append(UpBlock(spatial_dims, previous, skip, widths[i], norm))
            previous = widths[i]
        self.blocks = nn.ModuleList(blocks)
        self.head = UnetOutBlock(spatial_dims, widths[-1], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self.encoder, x, self.spatial_dims, self.min_side)
        intermediates = cast(Callable[..., list[torch.Tensor]], self.encoder.forward_intermediates)
        features = intermediates(x, indices=self.indices, intermediates_only=True)
        if len(features) != self.levels:
            raise ConfigError(
                f"{type(self.encoder).__name__}.forward_intermediates gave {len(features)} maps where its "
                f"feature_info promises {self.levels}; the encoder does not keep timm's contract"
            )
        features = [up(f) for up, f in zip(self.pyramid, features, strict=True)]
        skips = [*features[-2::-1], self.stem(x)]
        y = features[-1]
        for block, skip in zip(self.blocks, skips, strict=True):
            y = block(y, skip)
        return self.head(y)


class UpBlock(nn.Module):
    """Resize to the skip's size (nearest), concatenate, then conv-norm-act twice (MONAI UnetBasicBlock).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Channels of the deeper map.
        skip_channels: Channels of the skip map.
        out_channels: Channels out.
        norm: "group", "instance" or "batch".
    """

    def __init__(self, spatial_dims: int, in_channels: int, skip_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.conv = UnetBasicBlock(
            spatial_dims, in_channels + skip_channels, out_channels, 3, 1, norm_spec(norm, out_channels)
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        return self.conv(torch.cat([x, skip], dim=1))


def default_widths(levels: int) -> list[int]:
    """Decoder widths, deepest first: 16 * 2**k capped at 256 (256, 128, 64, 32, 16 for five levels)."""
    return [min(256, 16 * 2 ** (levels - 1 - i)) for i in range(levels)]


def norm_spec(norm: str, channels: int) -> str | tuple[str, dict]:
    """A MONAI norm spec for `channels`; group norm uses up to 8 groups that divide the channels."""
    if norm == "group":
        return ("group", {"num_groups": math.gcd(8, channels)})
    if norm == "instance":
        return ("instance", {"affine": True})
    return "batch"


def _pyramid(encoder: nn.Module) -> tuple[list[int], list[int]]:
    info = getattr(encoder, "feature_info", None)
    if not isinstance(info, Sequence) or not info:
        raise ConfigError(f"{type(encoder).__name__} has no timm feature_info; use a timm encoder")
    try:
        channels = [int(level["num_chs"]) for level in info]
        reductions = [int(level["reduction"]) for level in info]
    except (KeyError, TypeError):
        raise ConfigError(
            f"{type(encoder).__name__}.feature_info lacks num_chs/reduction; use a timm encoder"
        ) from None
    if reductions != sorted(reductions):
        raise ConfigError(f"{type(encoder).__name__}.feature_info reductions {reductions} do not grow with depth")
    return channels, reductions


def _in_channels(encoder: nn.Module) -> int:
    for module in encoder.modules():
        if isinstance(module, nn.Conv2d | nn.Conv3d):
            return int(module.in_channels)
    raise ConfigError(f"{type(encoder).__name__} has no convolution to take its input channels from")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
