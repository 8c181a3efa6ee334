"""Pretext tasks, one file each, registered by name on import; `build_objective` combines them with weights."""

from __future__ import annotations

from radpretrain.pretrain.tasks import (  # noqa: F401  (fills TASKS)
    barlow_twins,
    byol,
    dino,
    mae,
    metadata,
    moco,
    patch_ae,
    simclr,
    vicreg,
)
from radpretrain.pretrain.tasks.base import TASKS, Task, register_task
from radpretrain.pretrain.tasks.objective import Objective, build_objective

__all__ = ["TASKS", "Objective", "Task", "build_objective", "register_task"]
