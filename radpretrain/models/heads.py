"""Classification models: an encoder, its global pooling and a linear head, for 2D images or 3D volumes."""

from __future__ import annotations

import torch
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.models.inflate import check_input, spatial_dims_of


class Classifier(nn.Module):
    """Encoder features -> dropout -> linear: (B, C, *spatial) -> (B, num_classes) logits.

    The pooling is the encoder's own timm global pool (average over space for CNNs and their 3D
    inflations, the class token for ViTs): the same features the pretext tasks and the pretraining
    monitor's linear probe saw, so a frozen-encoder run is exactly a linear probe.

    Args:
        encoder: A timm encoder built with num_classes=0 (forward gives (B, num_features)), 2D or
            inflated 3D; the input rank follows it. Kept as `.encoder`.
        num_classes: Outputs (classes for cross-entropy; 1 for a binary logit or a regression target).
        dropout: Dropout probability before the linear head.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
        num_features = getattr(encoder, "num_features", None)
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ConfigError(f"{type(encoder).__name__} has no num_features; use a timm encoder")
        self.encoder = encoder
        self.spatial_dims = spatial_dims_of(encoder)
        self.num_classes = num_classes
        info = getattr(encoder, "feature_info", None) or [{"reduction": 1}]
        self.min_side = max(int(level.get("reduction", 1)) for level in info)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self.encoder, x, self.spatial_dims, self.min_side)
        features = self.encoder(x)
        if features.ndim != 2:
            raise ConfigError(
                f"{type(self.encoder).__name__} gives {tuple(features.shape)} features, not (B, num_features); "
                "build it with num_classes=0 and a global pool (radpretrain.models.encoders.build_encoder)"
            )
        return self.head(self.dropout(features))
