"""Several pretext tasks with weights on one shared encoder, seen by the loop as one module."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.pretrain.tasks.base import TASKS, Task
from radpretrain.shards.format import VIEW_NAMES


class Objective(nn.Module):
    """The weighted sum of named tasks.

    `views` is the union of the tasks' views (what the loader must produce). `forward(encoder, batch)`
    returns {"loss": sum of weight * task loss, "<task>/loss": ..., "<task>/<scalar>": ...} with every
    entry but "loss" detached. `after_step` forwards to every task (momentum updates).
    """

    def __init__(self, tasks: Mapping[str, Task], weights: Mapping[str, float]) -> None:
        super().__init__()
        self.tasks = nn.ModuleDict(dict(tasks))
        self.weights = {name: float(weights[name]) for name in tasks}
        wanted = {view for task in tasks.values() for view in task.views}
        self.views: tuple[str, ...] = tuple(view for view in VIEW_NAMES if view in wanted)

    def forward(self, encoder: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for name, task in self.tasks.items():
            result = task(encoder, batch)
            if "loss" not in result:
                raise RuntimeError(f"task '{name}' returned no 'loss'")
            weighted = self.weights[name] * result["loss"]
            total = weighted if total is None else total + weighted
            for key, value in result.items():
                out[f"{name}/{key}"] = value.detach()
        assert total is not None
        out["loss"] = total
        return out

    def after_step(self, encoder: nn.Module, step: int, total_steps: int) -> None:
        for task in self.tasks.values():
            task.after_step(encoder, step, total_steps)  # type: ignore[operator]


def build_objective(
    encoder: nn.Module,
    tasks: Mapping[str, float],
    task_options: Mapping[str, Mapping[str, Any]] | None = None,
    vocab: Mapping[str, list[str]] | None = None,
) -> Objective:
    """Build the named tasks (e.g. {"simclr": 1.0, "metadata": 0.5}) on `encoder`.

    Args:
        encoder: The shared timm encoder (from models.encoders.build_encoder); not owned by the objective.
        tasks: Task name -> positive weight.
        task_options: Task name -> options (see each task's docstring); unknown keys are refused.
        vocab: The shard manifest's class lists ({"body_part": [...], ...}) for label tasks.
    """
    task_options = task_options or {}
    if not tasks:
        raise ConfigError("no pretext task chosen; set e.g. tasks={simclr: 1.0}")
    for name in task_options:
        if name not in tasks:
            raise ConfigError(
                f"task_options.{name} is given but '{name}' is not in tasks; add it or remove its options"
            )
    num_features = int(getattr(encoder, "num_features", 0))
    if num_features <= 0:
        raise ConfigError(f"{type(encoder).__name__} has no num_features; build it with models.encoders.build_encoder")
    built: dict[str, Task] = {}
    for name, weight in tasks.items():
        cls = TASKS.get(name)
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ConfigError(f"tasks.{name} weight must be a positive number, got {weight!r}")
        built[name] = cls(encoder, num_features, dict(task_options.get(name) or {}), dict(vocab or {}))
    return Objective(built, tasks)
