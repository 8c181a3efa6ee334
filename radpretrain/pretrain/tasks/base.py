"""The contract every pretext task keeps: declare views, return {"loss": ..., scalars} from forward."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import nn

from radpretrain.registry import Registry

#: Views the loader can produce for a sample; a task asks for the ones it needs and the loader makes
#: the union once per sample (so SimCLR + metadata share the two strong views).
#: "view0"/"view1": independent strong augmentations; "plain": light augmentation (crop + window).
VIEW_NAMES = ("view0", "view1", "plain")

#: Label tensors always present in a batch: long, -1 where the label is missing.
LABEL_NAMES = ("body_part", "age_bucket", "sex", "view")


class Task(nn.Module, metaclass=abc.ABCMeta):
    """A pretext objective on a shared encoder.

    Subclasses set `views`, build their heads in `__init__` and return a dict from `forward` with a
    scalar tensor under "loss" plus any detached scalars to log. `encoder` is shared by all tasks of a
    run and is not owned (not registered as a submodule) by the task; momentum copies are.
    """

    views: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, encoder: nn.Module, num_features: int, options: dict[str, Any], vocab: dict[str, list[str]]
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.options = options
        self.vocab = vocab

    @abc.abstractmethod
    def forward(self, encoder: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Compute the task's loss on a batch of its views; returns {"loss": scalar, name: scalar ...}."""

    def after_step(self, encoder: nn.Module, step: int, total_steps: int) -> None:
        """Called after each optimiser step (momentum updates); most tasks do nothing."""


TASKS: Registry[type[Task]] = Registry("task")
