"""The CBR encoder family of Transfusion (Raghu et al. 2019), registered into timm when this module is imported."""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn

from radpretrain import intensity
from radpretrain.errors import ConfigError

# Listed explicitly: timm's register_model appends the CBR entrypoints here (and would create a list of
# only those if none existed).
__all__ = ["CBR_CONFIGS", "CBRBlock", "CBRNet"]

# --------------------------------------------------------------------------------------------------------------
# The CBR family (Transfusion, Raghu et al. 2019, appendix): each block is conv(k x k, stride 1) -> batchnorm ->
# ReLU -> maxpool(3x3, stride 2), followed by global average pooling. Convolutions use "same" padding and the
# pools padding 1 so that every block halves the map exactly: the feature pyramid then lines up with a U-Net
# decoder at reductions 2, 4, 8, 16 (, 32).
# --------------------------------------------------------------------------------------------------------------

#: name -> (kernel size, output channels of each block).
CBR_CONFIGS: dict[str, tuple[int, tuple[int, ...]]] = {
    "cbr_large_tall": (7, (32, 64, 128, 256, 512)),
    "cbr_large_wide": (7, (64, 128, 256, 512)),
    "cbr_small": (7, (32, 64, 128, 256)),
    "cbr_tiny": (5, (64, 128, 256, 512)),
}


class CBRBlock(nn.Sequential):
    """conv -> batchnorm -> ReLU -> 3x3/2 maxpool; (B, C_in, H, W) -> (B, C_out, ceil(H/2), ceil(W/2))."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)


class CBRNet(nn.Module):
    """A CBR network with timm's model contract (forward_features/head/intermediates, feature_info).

    - [0] Transfusion: Understanding Transfer Learning for Medical Imaging, Raghu et al. 2019,
      https://arxiv.org/abs/1902.07208

    Args:
        channels: Output channels of each block, input side first.
        kernel_size: Convolution kernel size of every block.
        in_chans: Input channels (1 for radiographs).
        num_classes: Classifier outputs; 0 gives pooled features of width `channels[-1]`.
        global_pool: timm pooling type ("avg", "max", "avgmax", "" for none).
        drop_rate: Dropout before the classifier.
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (32, 64, 128, 256),
        kernel_size: int = 7,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("channels must name at least one block, e.g. (32, 64, 128, 256)")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        blocks = []
        prev = in_chans
        for chs in channels:
            blocks.append(CBRBlock(prev, chs, kernel_size))
            prev = chs
        self.stages = nn.Sequential(*blocks)
        self.feature_info = [
            {"num_chs": chs, "reduction": 2 ** (i + 1), "module": f"stages.{i}"} for i, chs in enumerate(channels)
        ]
        self.num_features = self.head_hidden_size = channels[-1]
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"blocks": r"^stages\.(\d+)"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Block outputs, input side first (timm's contract): indices None = all, int = last n, list = these."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' for CBR models, got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early or intermediates_only else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last wanted intermediate (timm's contract)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cbr_cfg() -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (1, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (intensity.MEAN,),
        "std": (intensity.STD,),
        "first_conv": "stages.0.conv",
        "classifier": "head.fc",
        "license": "apache-2.0",
    }


# timm's register_model reads pretrained configs from the registering module's `default_cfgs`.
default_cfgs = generate_default_cfgs({name: _cbr_cfg() for name in CBR_CONFIGS})


def _create_cbr(variant: str, pretrained: bool = False, **kwargs: Any) -> CBRNet:
    # No weights are published; pretrained=True loads only a radpretrain export (timm's "local-dir:" or
    # "hf-hub:" folder of `radpretrain export --format hf`), whose config tells timm where its file is.
    cfg = kwargs.get("pretrained_cfg")
    source = cfg.get("source") if isinstance(cfg, dict) else getattr(cfg, "source", None)
    if pretrained and source not in ("local-dir", "hf-hub"):
        raise ConfigError(f"{variant} has no published weights; build it with pretrained=False")
    kernel_size, channels = CBR_CONFIGS[variant]
    kwargs.pop("img_size", None)  # a CNN takes any input size; accepted so ViT-style configs also build
    out_indices = kwargs.pop("out_indices", tuple(range(len(channels))))
    return build_model_with_cfg(
        CBRNet,
        variant,
        pretrained=pretrained,
        channels=channels,
        kernel_size=kernel_size,
        feature_cfg={"flatten_sequential": True, "out_indices": out_indices},
        **kwargs,
    )


@register_model
def cbr_large_tall(pretrained: bool = False, **kwargs: Any) -> CBRNet:
    """CBR-LargeT: five 7x7 blocks of 32-64-128-256-512 channels."""
    return _create_cbr("cbr_large_tall", pretrained, **kwargs)


@register_model
def cbr_large_wide(pretrained: bool = False, **kwargs: Any) -> CBRNet:
    """CBR-LargeW: four 7x7 blocks of 64-128-256-512 channels."""
    return _create_cbr("cbr_large_wide", pretrained, **kwargs)


@register_model
def cbr_small(pretrained: bool = False, **kwargs: Any) -> CBRNet:
    """CBR-Small: four 7x7 blocks of 32-64-128-256 channels."""
    return _create_cbr("cbr_small", pretrained, **kwargs)


@register_model
def cbr_tiny(pretrained: bool = False, **kwargs: Any) -> CBRNet:
    """CBR-Tiny: four 5x5 blocks of 64-128-256-512 channels."""
    return _create_cbr("cbr_tiny", pretrained, **kwargs)
