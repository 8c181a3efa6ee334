"""The optimiser step: what is decayed, and a step the fp16 gradient scaler skips moves nothing."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from radpretrain.models.encoders import build_encoder
from radpretrain.pretrain.checkpoint import TrainState
from radpretrain.pretrain.config import PretrainConfig
from radpretrain.pretrain.loop import PretrainModel, apply_update, build_optimizer, learning_rate
from radpretrain.pretrain.tasks import build_objective


def decayed_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, bool]:
    decay = {id(p): group["weight_decay"] > 0 for group in optimizer.param_groups for p in group["params"]}
    return {name: decay[id(p)] for name, p in model.named_parameters() if id(p) in decay}


def test_vit_position_embeddings_and_tokens_are_not_decayed() -> None:
    encoder = build_encoder("test_vit", img_size=32)
    model = PretrainModel(encoder, build_objective(encoder, {"mae": 1.0}))
    decayed = decayed_names(model, build_optimizer(model, PretrainConfig()))
    for name in ("encoder.pos_embed", "encoder.cls_token", "objective.tasks.mae.decoder.mask_token"):
        assert decayed[name] is False, name
    assert decayed["encoder.patch_embed.proj.weight"] and decayed["encoder.blocks.0.attn.qkv.weight"]
    assert not decayed["encoder.blocks.0.attn.qkv.bias"] and not decayed["encoder.norm.weight"]
    assert "objective.tasks.mae.decoder.pos_embed" not in decayed  # fixed sin-cos: not trained at all


class ScalerAccelerator:
    """The one property `apply_update` reads, answered by a real accelerate optimiser under a CPU GradScaler."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    @property
    def optimizer_step_was_skipped(self) -> bool:
        return bool(self.optimizer.step_was_skipped)


def test_a_step_the_scaler_skips_moves_neither_schedule_nor_momentum_encoder() -> None:
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)  # accelerate's optimiser wrapper needs its state
    torch.manual_seed(0)
    encoder = build_encoder("test_resnet", img_size=32)
    model = PretrainModel(encoder, build_objective(encoder, {"byol": 1.0}))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    optimizer = AcceleratedOptimizer(
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
        device_placement=False,
        scaler=scaler,
    )
    accelerator = ScalerAccelerator(optimizer)
    cfg = PretrainConfig(steps=10)
    state = TrainState()
    batch = {"view0": torch.randn(4, 1, 32, 32), "view1": torch.randn(4, 1, 32, 32)}

    def momentum_weights() -> list[torch.Tensor]:
        return [p.detach().clone() for p in model.objective.tasks["byol"].encoder_momentum.parameters()]

    def backward(poison: bool) -> None:
        scaler.scale(model(batch)["loss"]).backward()
        if poison:  # an fp16 overflow: the scaler finds an inf among the gradients and skips the step
            next(p for p in encoder.parameters() if p.grad is not None).grad.fill_(float("inf"))

    backward(poison=False)
    assert apply_update(accelerator, optimizer, model, state, cfg.steps)
    assert (state.step, state.skipped) == (1, 0)
    lr_before, momentum = learning_rate(state.step, cfg), momentum_weights()
    weights = {k: v.detach().clone() for k, v in encoder.named_parameters()}  # (BatchNorm statistics do move)

    backward(poison=True)
    assert not apply_update(accelerator, optimizer, model, state, cfg.steps)
    assert (state.step, state.skipped) == (1, 1)  # the schedule is a function of state.step: unchanged
    assert learning_rate(state.step, cfg) == lr_before
    for before, after in zip(momentum, momentum_weights(), strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    for key, value in encoder.named_parameters():
        torch.testing.assert_close(value.detach(), weights[key], rtol=0, atol=0)

    backward(poison=False)  # the next good step counts again and moves the momentum encoder
    assert apply_update(accelerator, optimizer, model, state, cfg.steps)
    assert state.step == 2
    assert any(not torch.equal(a, b) for a, b in zip(momentum, momentum_weights(), strict=True))


@pytest.mark.parametrize("skipped", [False, True])
def test_apply_update_reads_the_accelerator_flag(skipped: bool) -> None:
    calls: list[tuple[int, int]] = []

    class Objective(torch.nn.Module):
        def after_step(self, encoder: torch.nn.Module, step: int, total: int) -> None:
            calls.append((step, total))

    class Flag:
        optimizer_step_was_skipped = skipped

    encoder = torch.nn.Linear(2, 2)
    model = PretrainModel(encoder, Objective())
    state = TrainState(step=3)
    stepped = apply_update(Flag(), torch.optim.SGD(encoder.parameters(), lr=0.1), model, state, 10)
    assert stepped is not skipped
    assert (state.step, state.skipped, calls) == ((3, 1, []) if skipped else (4, 0, [(4, 10)]))
