"""Masked patch autoencoding for any encoder: hide random patches, rebuild their pixels from the last feature map."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from lightly.models.utils import patchify
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.pretrain.tasks.base import Task, check_fraction, check_positive, last_feature_map, register_task


def random_patch_mask(
    batch_size: int, grid: int, ratio: float, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, grid * grid) bool, True = hidden; exactly round(ratio * grid^2) patches per image (at least one)."""
    n = grid * grid
    hidden = min(max(1, round(ratio * n)), n - 1) if n > 1 else 1
    noise = torch.rand(batch_size, n, device=device, generator=generator)
    order = noise.argsort(dim=1)
    mask = torch.zeros(batch_size, n, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :hidden], True)
    return mask


def hide_patches(images: torch.Tensor, mask: torch.Tensor, patch_size: int, fill: float = 0.0) -> torch.Tensor:
    """Images with the masked patches set to `fill` (0 = the mean intensity in encoder units)."""
    b, _, h, w = images.shape
    grid_mask = mask.view(b, 1, h // patch_size, w // patch_size).to(images.dtype)
    pixel_mask = nn.functional.interpolate(grid_mask, scale_factor=patch_size, mode="nearest")
    return images * (1 - pixel_mask) + fill * pixel_mask


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch zero mean, unit variance targets (MAE's norm_pix_loss), shape kept (B, N, P)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def masked_patch_loss(
    pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool
) -> torch.Tensor:
    """Mean squared error over the pixels of hidden patches only.

    Args:
        pred: (B, N, C * patch_size**2) predicted patches in lightly's `patchify` order.
        images: (B, C, H, W) original (unmasked) images.
        mask: (B, N) bool, True = hidden patch.
        patch_size: Patch side in pixels.
        norm_pix: Compare with per-patch normalised pixels instead of raw ones.
    """
    target = patchify(images, patch_size)
    if norm_pix:
        target = normalize_patches(target)
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


class PatchDecoder(nn.Module):
    """A light convolutional decoder: (B, C, h, w) features -> (B, grid^2, out_chans * patch^2) patch pixels.

    Features are projected, resized to the patch grid (bilinear), mixed by one 3x3 convolution and mapped
    to each patch's pixels by a 1x1 convolution, so the decoder cannot do the encoder's work.
    """

    def __init__(self, in_chs: int, hidden: int, patch_size: int, out_chans: int = 1) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chs, hidden, 1)
        self.mix = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU())
        self.pred = nn.Conv2d(hidden, out_chans * patch_size * patch_size, 1)
        self.out_chans = out_chans

    def forward(self, features: torch.Tensor, grid: int) -> torch.Tensor:
        x = self.proj(features)
        if x.shape[-2:] != (grid, grid):
            x = nn.functional.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)
        return grid_to_patches(self.pred(self.mix(x)), self.patch_size, self.out_chans)


def grid_to_patches(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(B, C * p * p, gh, gw) in pixel_unshuffle layout -> (B, gh * gw, p * p * C) in lightly's patchify layout."""
    b, _, gh, gw = x.shape
    p = patch_size
    x = x.view(b, channels, p, p, gh, gw).permute(0, 4, 5, 2, 3, 1)
    return x.reshape(b, gh * gw, p * p * channels)


@register_task("patch_ae")
class PatchAutoencoder(Task):
    """Hide random square patches of a view, encode the masked image, reconstruct the hidden pixels.

    Works for CNN and ViT encoders alike (the decoder reads the last feature map of timm's
    `forward_intermediates`). Related to context encoders and MAE/SimMIM for CNNs.

    - [0] Context Encoders, 2016, https://arxiv.org/abs/1604.07379
    - [1] SimMIM, 2022, https://arxiv.org/abs/2111.09886

    Options:
        view: Which view to mask ("plain" or "view0").
        patch_size: Patch side in pixels; must divide the image size.
        mask_ratio: Fraction of patches hidden.
        norm_pix: Reconstruct per-patch normalised pixels (MAE's norm_pix_loss).
        decoder_dim: Width of the light decoder.

    Logs: "masked_fraction".
    """

    views = ("plain",)
    defaults: ClassVar[dict[str, Any]] = {
        "view": "plain",
        "patch_size": 16,
        "mask_ratio": 0.6,
        "norm_pix": True,
        "decoder_dim": 128,
    }

    def __init__(
        self, encoder: nn.Module, num_features: int, options: Mapping[str, Any], vocab: Mapping[str, list[str]]
    ) -> None:
        super().__init__(encoder, num_features, options, vocab)
        check_positive(self.name, self.options, "patch_size", "decoder_dim")
        check_fraction(self.name, self.options, "mask_ratio")
        if self.options["view"] not in ("plain", "view0", "view1"):
            raise ConfigError(f"task_options.patch_ae.view must be plain, view0 or view1, got {self.options['view']!r}")
        self.views = (self.options["view"],)
        self.patch_size = self.options["patch_size"]
        feature_info: Any = encoder.feature_info
        in_chs = int(feature_info[-1]["num_chs"])
        self.decoder = PatchDecoder(in_chs, self.options["decoder_dim"], self.patch_size)

    def forward(self, encoder: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch[self.views[0]]
        b, _, h, w = images.shape
        if h != w or h % self.patch_size:
            raise ConfigError(
                f"patch_ae needs square views whose side is a multiple of patch_size={self.patch_size}, got {h}x{w}; "
                "change data.image_size or task_options.patch_ae.patch_size"
            )
        grid = h // self.patch_size
        mask = random_patch_mask(b, grid, self.options["mask_ratio"], images.device)
        features = last_feature_map(encoder, hide_patches(images, mask, self.patch_size))
        pred = self.decoder(features, grid)
        loss = masked_patch_loss(pred, images, mask, self.patch_size, self.options["norm_pix"])
        return {"loss": loss, "masked_fraction": mask.float().mean().detach()}
