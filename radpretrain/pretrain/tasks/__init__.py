"""Pretext tasks, one file each, registered by name on import; `build_objective` combines them with weights."""

from __future__ import annotations

from radpretrain.pretrain.tasks import byol, mae, metadata, moco, patch_ae, simclr  # noqa: F401  (fills TASKS)
from radpretrain.pretrain.tasks.base import TASKS, Task, register_task
from radpretrain.pretrain.tasks.objective import Objective, build_objective

__all__ = ["TASKS", "Objective", "Task", "build_objective", "register_task"]
