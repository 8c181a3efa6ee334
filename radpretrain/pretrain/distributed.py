"""BatchNorm across processes: which modules share statistics over the global batch and which stay per process."""

from __future__ import annotations

import logging
from typing import Any, TypeVar, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)

#: Attribute that keeps a module's BatchNorm per process under sync_bn (MoCo v2's key encoder: Shuffle-BN).
PER_PROCESS_BN = "radpretrain_per_process_bn"


def sync_devices() -> tuple[str, ...]:
    """Device types torch's SyncBatchNorm can synchronise (it raises on CPU tensors once a process group exists)."""
    return ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name())


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def keep_per_process_bn(module: M) -> M:
    """Mark `module` so `convert_sync_batchnorm` leaves its BatchNorm layers (and those below) per process."""
    setattr(module, PER_PROCESS_BN, True)
    return module


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm (timm's BatchNormAct too) under `module` as its synchronised variant, in place where possible.

    Parameters and running statistics are shared with the replaced layers (no copy), so an optimiser built
    before still holds the right tensors. Modules marked with `keep_per_process_bn` are left as they are.
    Needs no process group: the layers synchronise only in training mode once one exists.
    """
    from timm.layers import convert_sync_batchnorm as timm_convert

    if getattr(module, PER_PROCESS_BN, False) or isinstance(module, nn.SyncBatchNorm):
        return module
    if isinstance(module, _BatchNorm):
        return timm_convert(module)
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child)
        if converted is not child:
            module.add_module(name, converted)
    return module


def sync_batchnorm(model: M, wanted: bool | None, accelerator: Any) -> M:
    """Apply a run's `sync_bn` choice to `model` before `accelerator.prepare`.

    `wanted` None (the default) means on when there is more than one process and the model has BatchNorm:
    per-process statistics make an 8-GPU run optimise a different objective than one GPU. On devices where
    torch cannot synchronise (gloo on CPU), one line says so and BatchNorm stays per process.
    """
    if wanted is False or accelerator.num_processes <= 1 or not has_batchnorm(model):
        return model
    device = torch.device(accelerator.device).type
    if device not in sync_devices():
        if accelerator.is_main_process:
            log.warning(
                "sync_bn: SyncBatchNorm cannot synchronise %s tensors; BatchNorm statistics stay per process "
                "(%d processes)",
                device,
                accelerator.num_processes,
            )
        return model
    return cast(M, convert_sync_batchnorm(model))
