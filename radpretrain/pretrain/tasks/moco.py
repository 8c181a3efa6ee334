"""MoCo: queries of one view match momentum-encoder keys of the other (v2: against a queue; v3: batch keys)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import BYOLPredictionHead, MoCoProjectionHead
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.models.utils import concat_all_gather
from lightly.utils import dist
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.pretrain.distributed import has_batchnorm, keep_per_process_bn
from radpretrain.pretrain.tasks.base import check_positive, register_task
from radpretrain.pretrain.tasks.momentum import MomentumTask


@register_task("moco")
class MoCo(MomentumTask):
    """InfoNCE between online queries and momentum keys; v2 draws negatives from a queue, v3 from the batch.

    v2 (default): the queue decouples the number of negatives from the batch size, which large radiographs
    keep small; MoCo-CXR showed it on chest radiographs. Both directions are scored in one call (queries
    of view0 with keys of view1 and the reverse), so the queue never holds the batch's own keys as
    negatives. Keys are computed with Shuffle-BN [0]: in a shuffled order across processes, so BatchNorm
    statistics cannot tell a query its positive key. The key encoder keeps per-process BatchNorm under
    sync_bn for the same reason. The queue is saved with checkpoints, so `--resume` continues it.

    v3: a prediction head on the queries, keys of the other view of the same (gathered) batch as
    negatives, no queue, a symmetric loss scaled by 2 x temperature; the momentum starts at 0.99 unless set.

    - [0] MoCo, 2020, https://arxiv.org/abs/1911.05722
    - [1] MoCo v2, 2020, https://arxiv.org/abs/2003.04297
    - [2] MoCo v3, 2021, https://arxiv.org/abs/2104.02057
    - [3] MoCo-CXR, 2021, https://arxiv.org/abs/2010.05352

    Options:
        version: 2 or 3.
        temperature: InfoNCE temperature (MoCo v2: 0.2; v3: 0.2 for ViTs, 1.0 for ResNets).
        memory_bank_size: v2: keys kept as negatives (gathered from every process); 0 uses in-batch negatives.
        momentum, momentum_end: EMA momentum, cosine-scheduled from the first to the second over the run
            (v2 default 0.999; v3 0.99).
        hidden_dim: Projection (and v3 prediction) head width; 0 means the encoder's feature width.
        output_dim: Projection size.
        bn_splits: v2: BatchNorm groups of a process's batch (queries and shuffled keys); 0: 1 with several
            processes (the processes are the groups), else 2 when the encoder has BatchNorm. On one process
            a shuffle alone changes no statistic, so the official single-GPU MoCo splits the batch.

    Logs: "momentum", "pos_cosine".
    """

    views = ("view0", "view1")
    defaults: ClassVar[dict[str, Any]] = {
        "version": 2,
        "temperature": 0.2,
        "memory_bank_size": 4096,
        "momentum": 0.999,
        "momentum_end": 1.0,
        "hidden_dim": 0,
        "output_dim": 128,
        "bn_splits": 0,
    }

    def __init__(
        self, encoder: nn.Module, num_features: int, options: Mapping[str, Any], vocab: Mapping[str, list[str]]
    ) -> None:
        super().__init__(encoder, num_features, options, vocab)
        check_positive(self.name, self.options, "temperature", "output_dim")
        version, bank = self.options["version"], self.options["memory_bank_size"]
        if version not in (2, 3):
            raise ConfigError(f"task_options.moco.version must be 2 or 3, got {version}")
        if bank < 0:
            raise ConfigError(f"task_options.moco.memory_bank_size must be >= 0, got {bank}")
        if self.options["bn_splits"] < 0:
            splits = self.options["bn_splits"]
            raise ConfigError(f"task_options.moco.bn_splits must be >= 0 (0 = automatic), got {splits}")
        if version == 3:
            unused = sorted({"memory_bank_size", "bn_splits"} & set(options))
            if unused:
                raise ConfigError(
                    f"task_options.moco.{unused[0]} is a MoCo v2 option (v3 has no queue and no Shuffle-BN); remove it"
                )
            if "momentum" not in options:
                self.options["momentum"] = 0.99
        self.version = version
        self.encoder_has_bn = has_batchnorm(encoder)
        out = self.options["output_dim"]
        hidden = self.options["hidden_dim"] or num_features
        if version == 2:
            self.projection_head = MoCoProjectionHead(num_features, hidden, out)
            self.criterion = NTXentLoss(
                temperature=self.options["temperature"],
                memory_bank_size=(bank, out) if bank else 0,
                gather_distributed=True,
            )
            if bank:
                keep_queue(self.criterion)
        else:
            self.projection_head = MoCoProjectionHead(num_features, hidden, out, num_layers=3, batch_norm=True)
            self.prediction_head = BYOLPredictionHead(out, hidden, out)
        self.init_momentum(encoder)
        if version == 2:
            keep_per_process_bn(self.encoder_momentum)  # Shuffle-BN needs per-process key statistics

    def bn_groups(self, batch_size: int) -> int:
        """BatchNorm groups per process for v2 (see `bn_splits`), at least two samples each."""
        splits = self.options["bn_splits"]
        if splits == 0:
            splits = 2 if self.encoder_has_bn and dist.world_size() == 1 else 1
        return max(1, min(splits, batch_size // 2))

    def forward(self, encoder: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = torch.cat([batch["view0"], batch["view1"]])
        if self.version == 3:
            return self.forward_v3(encoder, x)
        groups = self.bn_groups(len(x))
        features = torch.cat([encoder(part) for part in x.chunk(groups)]) if groups > 1 else encoder(x)
        q0, q1 = self.projection_head(features).chunk(2)
        k0, k1 = self.momentum_projection(x, shuffle=True, splits=groups).chunk(2)
        loss = self.criterion(torch.cat([q0, q1]), torch.cat([k1, k0]))
        cosine = nn.functional.cosine_similarity(q0.detach(), k1, dim=1).mean()
        return {"loss": loss, "momentum": self.momentum.detach().clone(), "pos_cosine": cosine}

    def forward_v3(self, encoder: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        q0, q1 = self.prediction_head(self.projection_head(encoder(x))).chunk(2)
        k0, k1 = self.momentum_projection(x).chunk(2)
        t = self.options["temperature"]
        loss = contrastive_v3(q0, k1, t) + contrastive_v3(q1, k0, t)
        cosine = nn.functional.cosine_similarity(q0.detach(), k1, dim=1).mean()
        return {"loss": loss, "momentum": self.momentum.detach().clone(), "pos_cosine": cosine}


def contrastive_v3(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's InfoNCE: (B, D) queries against the keys of every process, positives on the diagonal.

    Keys carry no gradient (momentum encoder), so gathering them needs none. Scaled by 2 x temperature
    as in the paper, which keeps the gradient size independent of the temperature.
    """
    queries = nn.functional.normalize(queries.float(), dim=1)
    keys = nn.functional.normalize(keys.float(), dim=1)
    if dist.world_size() > 1:
        keys = concat_all_gather(keys.contiguous())
    logits = queries @ keys.T / temperature
    labels = torch.arange(len(queries), device=queries.device) + dist.rank() * len(queries)
    return nn.functional.cross_entropy(logits, labels) * 2 * temperature


def keep_queue(criterion: nn.Module) -> None:
    """Make lightly's memory bank (registered as non-persistent buffers) part of the state dict.

    Otherwise a checkpoint loses the queue and `--resume` starts from random negatives.
    """
    for module in criterion.modules():
        if isinstance(module, MemoryBankModule):
            for name in ("bank", "bank_ptr"):
                module.register_buffer(name, getattr(module, name), persistent=True)
