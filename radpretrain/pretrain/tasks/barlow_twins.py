"""Barlow Twins: the cross-correlation of two strong views' projections is driven towards the identity matrix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from torch import nn

from radpretrain.pretrain.tasks.base import Task, check_positive, register_task


@register_task("barlow_twins")
class BarlowTwins(Task):
    """lightly's Barlow Twins loss on projections of two strong views, the correlation averaged over processes.

    No negatives and no momentum network: redundancy reduction between the projection's dimensions
    keeps the embeddings from collapsing, so it holds up at the small per-GPU batches large radiographs
    force (the paper finds it robust down to a batch of 256, where SimCLR degrades). With several
    processes the cross-correlation matrices are averaged over them (each process standardises its own
    projections, as in lightly and the authors' code).

    - [0] Barlow Twins, 2021, https://arxiv.org/abs/2103.03230
    - [1] https://github.com/facebookresearch/barlowtwins

    Options:
        lambda_param: Weight of the off-diagonal (redundancy reduction) term; the paper's 5e-3.
        hidden_dim: Projector width; the paper's 8192 is large for small data and slow on CPUs, hence 2048.
        output_dim: Projection size (paper: 8192).

    Logs: "on_diagonal" (mean correlation of a dimension with itself across views, 1 at the optimum),
    "off_diagonal" (mean absolute correlation between different dimensions, 0 at the optimum).
    """

    views = ("view0", "view1")
    defaults: ClassVar[dict[str, Any]] = {"lambda_param": 5e-3, "hidden_dim": 2048, "output_dim": 2048}

    def __init__(
        self, encoder: nn.Module, num_features: int, options: Mapping[str, Any], vocab: Mapping[str, list[str]]
    ) -> None:
        super().__init__(encoder, num_features, options, vocab)
        check_positive(self.name, self.options, "lambda_param", "hidden_dim", "output_dim")
        self.projection_head = BarlowTwinsProjectionHead(
            num_features, self.options["hidden_dim"], self.options["output_dim"]
        )
        self.criterion = BarlowTwinsLoss(lambda_param=self.options["lambda_param"], gather_distributed=True)

    def forward(self, encoder: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # One encoder pass over both views: batch-norm statistics cover 2B images.
        z = self.projection_head(encoder(torch.cat([batch["view0"], batch["view1"]])))
        z0, z1 = z.float().chunk(2)
        # The correlation matrix in float32 even under autocast: its diagonal must resolve 1 - c to ~1e-3.
        with torch.autocast(z.device.type, enabled=False):
            loss = self.criterion(z0, z1)
        with torch.no_grad():
            c = cross_correlation(z0.detach(), z1.detach())
            off = ~torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
        return {"loss": loss, "on_diagonal": c.diagonal().mean(), "off_diagonal": c[off].abs().mean()}


def cross_correlation(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """(D, D) correlation of (N, D) projections, each dimension standardised over the batch (biased variance)."""
    a = (z0 - z0.mean(0)) / torch.sqrt(z0.var(0, unbiased=False) + 1e-5)
    b = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + 1e-5)
    return a.T @ b / z0.shape[0]
