"""MoCo v2: queries of one view match momentum-encoder keys of the other against a queue of past keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.pretrain.tasks.base import check_positive, register_task
from radpretrain.pretrain.tasks.momentum import MomentumTask


@register_task("moco")
class MoCo(MomentumTask):
    """InfoNCE between online queries and momentum keys, negatives from a memory bank of earlier keys.

    The queue decouples the number of negatives from the batch size, which large radiographs keep small;
    MoCo-CXR showed it on chest radiographs. Both directions are scored in one call (queries of view0
    with keys of view1 and the reverse), so the bank never holds the batch's own keys as negatives.

    - [0] MoCo, 2020, https://arxiv.org/abs/1911.05722
    - [1] MoCo v2, 2020, https://arxiv.org/abs/2003.04297
    - [2] MoCo-CXR, 2021, https://arxiv.org/abs/2010.05352

    Options:
        temperature: InfoNCE temperature (MoCo v2: 0.2).
        memory_bank_size: Keys kept as negatives (gathered from every process); 0 uses in-batch negatives.
        momentum, momentum_end: EMA momentum, cosine-scheduled from the first to the second over the run.
        hidden_dim: Projection head width; 0 means the encoder's feature width.
        output_dim: Projection size.

    Logs: "momentum", "pos_cosine".
    """

    views = ("view0", "view1")
    defaults: ClassVar[dict[str, Any]] = {
        "temperature": 0.2,
        "memory_bank_size": 4096,
        "momentum": 0.99,
        "momentum_end": 1.0,
        "hidden_dim": 0,
        "output_dim": 128,
    }

    def __init__(
        self, encoder: nn.Module, num_features: int, options: Mapping[str, Any], vocab: Mapping[str, list[str]]
    ) -> None:
        super().__init__(encoder, num_features, options, vocab)
        check_positive(self.name, self.options, "temperature", "output_dim")
        bank = self.options["memory_bank_size"]
        if bank < 0:
            raise ConfigError(f"task_options.moco.memory_bank_size must be >= 0, got {bank}")
        out = self.options["output_dim"]
        self.projection_head = MoCoProjectionHead(num_features, self.options["hidden_dim"] or num_features, out)
        self.criterion = NTXentLoss(
            temperature=self.options["temperature"],
            memory_bank_size=(bank, out) if bank else 0,
            gather_distributed=True,
        )
        self.init_momentum(encoder)

    def forward(self, encoder: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = torch.cat([batch["view0"], batch["view1"]])
        q0, q1 = self.projection_head(encoder(x)).chunk(2)
        k0, k1 = self.momentum_projection(x).chunk(2)
        loss = self.criterion(torch.cat([q0, q1]), torch.cat([k1, k0]))
        cosine = nn.functional.cosine_similarity(q0.detach(), k1, dim=1).mean()
        return {"loss": loss, "momentum": self.momentum.detach().clone(), "pos_cosine": cosine}
