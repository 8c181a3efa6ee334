"""sync_bn: BatchNorm layers become synchronised ones where torch can do it, and one line says when it cannot."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from torch import nn

from radpretrain.pretrain.distributed import convert_sync_batchnorm, keep_per_process_bn, sync_batchnorm


@dataclass
class FakeAccelerator:
    num_processes: int
    device: torch.device
    is_main_process: bool = True


def small_model() -> nn.Module:
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), BatchNormAct2d(4), nn.Flatten(), nn.Linear(64, 8))
    head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    keys = keep_per_process_bn(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
    return nn.ModuleDict({"encoder": encoder, "head": head, "key": keys})


def test_conversion_replaces_every_batchnorm_but_the_marked_ones_and_shares_the_tensors() -> None:
    model = small_model()
    weight, running = model["encoder"][1].weight, model["encoder"][1].running_mean
    act = model["encoder"][2].act
    converted = convert_sync_batchnorm(model)
    assert converted is model  # in place: the loop keeps its references to the encoder
    assert type(model["encoder"][1]) is nn.SyncBatchNorm and type(model["head"][1]) is nn.SyncBatchNorm
    assert isinstance(model["encoder"][2], SyncBatchNormAct) and model["encoder"][2].act is act  # timm's norm+act
    assert model["encoder"][1].weight is weight and model["encoder"][1].running_mean is running
    assert type(model["key"][1]) is nn.BatchNorm2d  # MoCo v2's key encoder keeps per-process statistics
    # without a process group the converted model still runs (as plain BatchNorm)
    assert model["encoder"](torch.randn(3, 1, 6, 6)).shape == (3, 8)


def test_sync_bn_choice_follows_processes_devices_and_the_setting(caplog: pytest.LogCaptureFixture) -> None:
    def batchnorms(model: nn.Module) -> list[type]:
        return [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    caplog.set_level(logging.INFO)
    one = sync_batchnorm(small_model(), None, FakeAccelerator(1, torch.device("cpu")))
    assert nn.SyncBatchNorm not in batchnorms(one) and not caplog.records
    off = sync_batchnorm(small_model(), False, FakeAccelerator(2, torch.device("cuda", 0)))
    assert nn.SyncBatchNorm not in batchnorms(off)
    on = sync_batchnorm(small_model(), None, FakeAccelerator(2, torch.device("cuda", 0)))
    assert batchnorms(on).count(nn.SyncBatchNorm) == 2 and not caplog.records
    no_bn = nn.Sequential(nn.Linear(2, 2))
    assert sync_batchnorm(no_bn, True, FakeAccelerator(2, torch.device("cuda", 0))) is no_bn

    cpu = sync_batchnorm(small_model(), None, FakeAccelerator(2, torch.device("cpu")))
    assert nn.SyncBatchNorm not in batchnorms(cpu)
    assert [r.getMessage() for r in caplog.records] == [
        "sync_bn: SyncBatchNorm cannot synchronise cpu tensors; BatchNorm statistics stay per process (2 processes)"
    ]
