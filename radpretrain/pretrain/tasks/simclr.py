"""SimCLR: two strong views of a radiograph attract, all other images in the (global) batch repel."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

from radpretrain.pretrain.tasks.base import Task, check_positive, register_task


@register_task("simclr")
class SimCLR(Task):
    """NT-Xent on projections of two strong views, negatives gathered from every process.

    - [0] SimCLR, 2020, https://arxiv.org/abs/2002.05709

    Options:
        temperature: NT-Xent temperature (the paper's best at large batch: 0.1).
        hidden_dim: Projection head width; 0 means the encoder's feature width.
        output_dim: Projection size.
        num_layers: Projection head layers (SimCLR v2 uses 3).

    Logs: "pos_cosine" (mean cosine similarity of the two views' projections).
    """

    views = ("view0", "view1")
    defaults: ClassVar[dict[str, Any]] = {"temperature": 0.1, "hidden_dim": 0, "output_dim": 128, "num_layers": 2}

    def __init__(
        self, encoder: nn.Module, num_features: int, options: Mapping[str, Any], vocab: Mapping[str, list[str]]
    ) -> None:
        super().__init__(encoder, num_features, options, vocab)
        check_positive(self.name, self.options, "temperature", "output_dim", "num_layers")
        hidden = self.options["hidden_dim"] or num_features
        self.projection_head = SimCLRProjectionHead(
            num_features, hidden, self.options["output_dim"], num_layers=self.options["num_layers"]
        )
        self.criterion = NTXentLoss(temperature=self.options["temperature"], gather_distributed=True)

    def forward(self, encoder: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # One encoder pass over both views: batch-norm statistics then cover 2B images, as in the paper.
        z = self.projection_head(encoder(torch.cat([batch["view0"], batch["view1"]])))
        # NT-Xent in float32 even under autocast: bf16/fp16 logits of cosine similarities / 0.1 lose the small
        # differences between negatives the softmax compares (autocast would recast float32 inputs of a matmul).
        z0, z1 = z.float().chunk(2)
        with torch.autocast(device_type=z.device.type, enabled=False):
            loss = self.criterion(z0, z1)
        cosine = nn.functional.cosine_similarity(z0.detach(), z1.detach(), dim=1).mean()
        return {"loss": loss, "pos_cosine": cosine}
