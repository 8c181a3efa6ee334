"""encoder.init: pretraining starts from weights on disk (a local timm model folder), recorded by name only."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from timm.models._hub import save_for_hf

from radpretrain.errors import ConfigError
from radpretrain.models.encoders import build_encoder
from radpretrain.models.weights import init_encoder_from
from radpretrain.pretrain import loop
from radpretrain.pretrain.checkpoint import export_encoder
from radpretrain.pretrain.config import PretrainConfig

MakeConfig = Callable[..., PretrainConfig]


def first_weights(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """The encoder's parameters as the optimiser receives them, before the first step."""
    seen: dict[str, torch.Tensor] = {}
    original = loop.build_optimizer

    def spy(model: Any, cfg: PretrainConfig) -> torch.optim.Optimizer:
        seen.update({k: v.detach().clone() for k, v in model.encoder.state_dict().items()})
        return original(model, cfg)

    monkeypatch.setattr(loop, "build_optimizer", spy)
    return seen


def test_pretraining_starts_from_a_local_timm_checkpoint(
    make_config: MakeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(123)
    folder = tmp_path / "imagenet-test-resnet"  # like a downloaded timm/... folder: RGB stem and a classifier
    save_for_hf(timm.create_model("test_resnet", pretrained=False), str(folder), safe_serialization=True)
    expected = build_encoder("test_resnet", img_size=32)
    init_encoder_from(expected, folder)  # the one loader: stem folded to one channel, head dropped

    seen = first_weights(monkeypatch)
    run = tmp_path / "run"
    loop.pretrain(make_config("steps=1", f"encoder.init={folder}", out=run))
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(seen[key], value, rtol=0, atol=0, msg=key)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["init"] == "imagenet-test-resnet"
    out = export_encoder(run, tmp_path / "enc")
    card = json.loads((out / "encoder.json").read_text())
    assert card["init"] == "imagenet-test-resnet"
    readme = (out / "README.md").read_text()
    assert "Initial weights: `imagenet-test-resnet`" in readme and str(tmp_path) not in readme + json.dumps(card)

    # encoder.init is part of the model: a resume may not change it
    with pytest.raises(ConfigError, match=r"cannot resume .*encoder"):
        loop.pretrain(make_config("steps=2", "resume=true", out=run))

    # without init the run starts from timm's random weights, not these
    seen.clear()
    loop.pretrain(make_config("steps=1", out=tmp_path / "random"))
    stem = next(iter(expected.state_dict()))
    assert not torch.equal(seen[stem], expected.state_dict()[stem])
    random_card = (export_encoder(tmp_path / "random", tmp_path / "enc-random") / "README.md").read_text()
    assert "Initial weights: random" in random_card


def test_weights_for_another_architecture_are_refused_before_training(make_config: MakeConfig, tmp_path: Path) -> None:
    folder = tmp_path / "vit"
    save_for_hf(timm.create_model("test_vit", pretrained=False), str(folder), safe_serialization=True)
    with pytest.raises(ConfigError, match="are for 'test_vit', the encoder is 'test_resnet'"):
        loop.pretrain(make_config("steps=1", f"encoder.init={folder}"))
    assert not (tmp_path / "run" / "checkpoint").exists()
