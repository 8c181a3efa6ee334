"""BYOL: an online network predicts a slowly moving (momentum) network's projection of the other view."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from torch import nn

from radpretrain.pretrain.tasks.base import check_positive, register_task
from radpretrain.pretrain.tasks.momentum import MomentumTask


@register_task("byol")
class BYOL(MomentumTask):
    """Symmetrised negative cosine similarity between online predictions and momentum projections.

    No negatives, so it works with the small per-GPU batches that large radiographs force.

    - [0] BYOL, 2020, https://arxiv.org/abs/2006.07733

    Options:
        momentum: Starting EMA momentum; it follows a cosine schedule up to `momentum_end` at the last step.
        momentum_end: Final EMA momentum.
        hidden_dim: Projection/prediction head width; 0 means 2x the encoder's feature width.
        output_dim: Projection size.

    The momentum copies of the encoder and the projection head belong to this task (they are saved with
    checkpoints); `after_step` moves them towards the online weights.
    Logs: "momentum".
    """

    views = ("view0", "view1")
    defaults: ClassVar[dict[str, Any]] = {"momentum": 0.99, "momentum_end": 1.0, "hidden_dim": 0, "output_dim": 256}

    def __init__(
        self, encoder: nn.Module, num_features: int, options: Mapping[str, Any], vocab: Mapping[str, list[str]]
    ) -> None:
        super().__init__(encoder, num_features, options, vocab)
        check_positive(self.name, self.options, "output_dim")
        hidden = self.options["hidden_dim"] or 2 * num_features
        out = self.options["output_dim"]
        self.projection_head = BYOLProjectionHead(num_features, hidden, out)
        self.prediction_head = BYOLPredictionHead(out, hidden, out)
        self.criterion = NegativeCosineSimilarity()
        self.init_momentum(encoder)

    def forward(self, encoder: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = torch.cat([batch["view0"], batch["view1"]])
        p0, p1 = self.prediction_head(self.projection_head(encoder(x))).chunk(2)
        z0, z1 = self.momentum_projection(x).chunk(2)
        loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        return {"loss": loss, "momentum": self.momentum.detach().clone()}
