"""VICReg: two strong views agree (invariance) while each dimension keeps its variance and dimensions decorrelate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from lightly.loss import VICRegLoss
from lightly.loss.vicreg_loss import covariance_loss, invariance_loss, variance_loss
from lightly.models.modules.heads import VICRegProjectionHead
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.pretrain.tasks.base import Task, check_positive, register_task


@register_task("vicreg")
class VICReg(Task):
    """lightly's VICReg loss on projections of two strong views; variance and covariance over the global batch.

    No negatives and no momentum network: the variance and covariance terms keep the embeddings from
    collapsing, so it holds up at the small per-GPU batches large radiographs force (the paper reports
    stable results down to a global batch of 256). With several processes the variance and covariance
    are computed on the projections gathered from every process.

    - [0] VICReg, 2022, https://arxiv.org/abs/2105.04906
    - [1] https://github.com/facebookresearch/vicreg

    Options:
        lambda_param: Weight of the invariance (mean squared error) term; the paper's 25.
        mu_param: Weight of the variance (hinge on each dimension's standard deviation) term; 25.
        nu_param: Weight of the covariance (off-diagonal) term; 1.
        hidden_dim: Projector width; the paper's 8192 is large for small data and slow on CPUs, hence 2048.
        output_dim: Projection size (paper: 8192).
        num_layers: Projector layers (paper: 3).

    Logs: "invariance", "variance", "covariance" (the unweighted terms, this process's batch).
    """

    views = ("view0", "view1")
    defaults: ClassVar[dict[str, Any]] = {
        "lambda_param": 25.0,
        "mu_param": 25.0,
        "nu_param": 1.0,
        "hidden_dim": 2048,
        "output_dim": 2048,
        "num_layers": 3,
    }

    def __init__(
        self, encoder: nn.Module, num_features: int, options: Mapping[str, Any], vocab: Mapping[str, list[str]]
    ) -> None:
        super().__init__(encoder, num_features, options, vocab)
        check_positive(self.name, self.options, "hidden_dim", "output_dim")
        for name in ("lambda_param", "mu_param", "nu_param"):
            if self.options[name] < 0:
                raise ConfigError(f"task_options.{self.name}.{name} must be >= 0, got {self.options[name]}")
        if self.options["num_layers"] < 2:
            raise ConfigError(f"task_options.{self.name}.num_layers must be >= 2, got {self.options['num_layers']}")
        self.projection_head = VICRegProjectionHead(
            num_features, self.options["hidden_dim"], self.options["output_dim"], num_layers=self.options["num_layers"]
        )
        self.criterion = VICRegLoss(
            lambda_param=self.options["lambda_param"],
            mu_param=self.options["mu_param"],
            nu_param=self.options["nu_param"],
            gather_distributed=True,
        )

    def forward(self, encoder: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # One encoder pass over both views, as SimCLR does: batch-norm statistics cover 2B images.
        z = self.projection_head(encoder(torch.cat([batch["view0"], batch["view1"]])))
        z0, z1 = z.float().chunk(2)
        # Variances and covariances in float32 even under autocast: in bf16 they are too coarse to balance.
        with torch.autocast(z.device.type, enabled=False):
            loss = self.criterion(z0, z1)
        with torch.no_grad():
            a, b = z0.detach(), z1.detach()
            terms = {
                "invariance": invariance_loss(a, b),
                "variance": 0.5 * (variance_loss(a, self.criterion.eps) + variance_loss(b, self.criterion.eps)),
                "covariance": covariance_loss(a) + covariance_loss(b),
            }
        return {"loss": loss, **terms}
