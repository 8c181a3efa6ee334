"""What momentum methods (BYOL, MoCo) share: EMA copies of the encoder and projection head, moved after each step."""

from __future__ import annotations

import copy

import torch
from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad, update_momentum
from lightly.utils import dist
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.pretrain.tasks.base import Task


class MomentumTask(Task):
    """A task with a momentum (EMA) copy of the encoder and of its `projection_head`.

    Options `momentum` and `momentum_end`: the EMA momentum follows a cosine schedule from the first to
    the second over the run. The copies belong to the task (saved with checkpoints).
    """

    momentum: torch.Tensor
    projection_head: nn.Module

    def init_momentum(self, encoder: nn.Module) -> None:
        """Call at the end of `__init__`, once `self.projection_head` exists."""
        start, end = self.options["momentum"], self.options["momentum_end"]
        if not 0.0 <= start <= end <= 1.0:
            raise ConfigError(
                f"task_options.{self.name} needs 0 <= momentum <= momentum_end <= 1, got {start} and {end} "
                "(e.g. 0.99, 1.0)"
            )
        self.encoder_momentum = copy.deepcopy(encoder)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.encoder_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.register_buffer("momentum", torch.tensor(float(start)))

    @torch.no_grad()
    def momentum_projection(self, x: torch.Tensor, shuffle: bool = False, splits: int = 1) -> torch.Tensor:
        """The momentum projections of `x` (B, ...) -> (B, D), in the order of `x`.

        `shuffle` (Shuffle-BN, MoCo): the momentum networks see the batch in a random order, across all
        processes when there are several (lightly's batch_shuffle), so a key's BatchNorm statistics come from
        other samples than its query's. `splits` > 1 runs the shuffled batch in that many groups with their
        own statistics, which is what several processes give; on one process a permutation alone changes no
        statistic.
        """
        distributed = dist.world_size() > 1
        if shuffle:
            x, order = batch_shuffle(x, distributed=distributed)
        z = torch.cat([self.projection_head_momentum(self.encoder_momentum(part)) for part in x.chunk(splits)])
        return batch_unshuffle(z, order, distributed=distributed) if shuffle else z

    @torch.no_grad()
    def after_step(self, encoder: nn.Module, step: int, total_steps: int) -> None:
        m = cosine_schedule(
            min(step, total_steps), max(total_steps, 1), self.options["momentum"], self.options["momentum_end"]
        )
        update_momentum(encoder, self.encoder_momentum, m)
        update_momentum(self.projection_head, self.projection_head_momentum, m)
        self.momentum.fill_(m)
