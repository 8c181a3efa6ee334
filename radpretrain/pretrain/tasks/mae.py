"""MAE: a ViT encodes a random quarter of the patches, a small transformer decoder reconstructs the rest."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from lightly.models import utils
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.pretrain.tasks.base import Task, check_fraction, check_positive, is_vit, register_task
from radpretrain.pretrain.tasks.patch_ae import normalize_patches


def random_patch_tokens(
    batch_size: int, num_patches: int, num_prefix: int, ratio: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx_keep, idx_mask) token indices; prefix tokens (class/register) are always kept."""
    keep, hidden = utils.random_token_mask((batch_size, num_patches), ratio, mask_class_token=True, device=device)
    keep = keep + num_prefix
    prefix = torch.arange(num_prefix, device=device).expand(batch_size, num_prefix)
    return torch.cat([prefix, keep], dim=1), hidden + num_prefix


@register_task("mae")
class MAE(Task):
    """Masked autoencoder with lightly's masked ViT wrapper and transformer decoder (timm blocks).

    - [0] Masked Autoencoders Are Scalable Vision Learners, 2021, https://arxiv.org/abs/2111.06377

    Options:
        view: Which view to mask ("plain" or "view0").
        mask_ratio: Fraction of patch tokens hidden from the encoder (the paper's 0.75).
        decoder_dim, decoder_depth, decoder_heads: The decoder transformer.
        norm_pix: Reconstruct per-patch normalised pixels (the paper's better variant).

    Requires a timm VisionTransformer encoder (e.g. vit_small_patch16_224); use patch_ae for CNNs.
    Logs: nothing beyond the loss.
    """

    views = ("plain",)
    encoder_kinds = ("vit",)
    defaults: ClassVar[dict[str, Any]] = {
        "view": "plain",
        "mask_ratio": 0.75,
        "decoder_dim": 256,
        "decoder_depth": 4,
        "decoder_heads": 8,
        "norm_pix": True,
    }

    def __init__(
        self, encoder: nn.Module, num_features: int, options: Mapping[str, Any], vocab: Mapping[str, list[str]]
    ) -> None:
        super().__init__(encoder, num_features, options, vocab)
        if not is_vit(encoder):
            raise ConfigError(
                f"mae needs a ViT encoder (e.g. vit_small_patch16_224), got {type(encoder).__name__}; "
                "use patch_ae for CNN encoders"
            )
        check_positive(self.name, self.options, "decoder_dim", "decoder_depth", "decoder_heads")
        check_fraction(self.name, self.options, "mask_ratio")
        if self.options["view"] not in ("plain", "view0", "view1"):
            raise ConfigError(f"task_options.mae.view must be plain, view0 or view1, got {self.options['view']!r}")
        if self.options["decoder_dim"] % self.options["decoder_heads"]:
            raise ConfigError("task_options.mae.decoder_dim must be a multiple of decoder_heads")
        self.views = (self.options["view"],)
        vit: Any = encoder
        patch = vit.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.num_patches = int(vit.patch_embed.num_patches)
        self.num_prefix = int(vit.num_prefix_tokens)
        in_chans = int(vit.patch_embed.proj.in_channels)
        dim = self.options["decoder_dim"]
        self.decoder_embed = nn.Linear(vit.embed_dim, dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=self.num_patches,
            embed_dim=dim,
            depth=self.options["decoder_depth"],
            num_heads=self.options["decoder_heads"],
            num_prefix_tokens=self.num_prefix,
        )
        self.decoder_pred = nn.Linear(dim, self.patch_size**2 * in_chans)
        # The masked wrapper is rebuilt around whatever encoder object forward() receives and is not a
        # submodule: the encoder belongs to the run, and re-initialising its weights here would change the
        # other tasks' starting point ("skip" keeps timm's initialisation).
        self._wrapped: tuple[int, MaskedVisionTransformerTIMM] | None = None

    def _masked(self, encoder: nn.Module) -> MaskedVisionTransformerTIMM:
        if self._wrapped is None or self._wrapped[0] != id(encoder):
            wrapper = MaskedVisionTransformerTIMM(
                vit=encoder, weight_initialization="skip", pos_embed_initialization="skip"
            )
            self._wrapped = (id(encoder), wrapper)
        return self._wrapped[1]

    def forward(self, encoder: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch[self.views[0]]
        b, _, h, w = images.shape
        grid = int(self.num_patches**0.5)
        if h != w or h != grid * self.patch_size:
            raise ConfigError(
                f"mae needs {grid * self.patch_size}x{grid * self.patch_size} views for this encoder, got {h}x{w}; "
                "build the encoder with img_size equal to data.image_size"
            )
        idx_keep, idx_mask = random_patch_tokens(
            b, self.num_patches, self.num_prefix, self.options["mask_ratio"], images.device
        )
        encoded = self._masked(encoder).encode(images, idx_keep=idx_keep)
        tokens = self.decoder_embed(encoded)
        full = utils.repeat_token(self.decoder.mask_token, (b, self.num_patches + self.num_prefix))
        full = utils.set_at_index(full, idx_keep, tokens.type_as(full))
        decoded = self.decoder(full)
        pred = self.decoder_pred(utils.get_at_index(decoded, idx_mask))
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - self.num_prefix)
        if self.options["norm_pix"]:
            target = normalize_patches(target)
        loss = nn.functional.mse_loss(pred.float(), target.float())
        return {"loss": loss}
