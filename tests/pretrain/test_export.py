"""Export: safetensors + json card + model card from a run; loads with radpretrain and with plain timm."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import radpretrain
from radpretrain import intensity
from radpretrain.cli import main
from radpretrain.models.encoders import build_encoder
from radpretrain.pretrain.checkpoint import read_encoder_weights
from radpretrain.pretrain.config import PretrainConfig
from radpretrain.pretrain.loop import pretrain


def test_export_writes_a_loadable_encoder_and_its_card(
    make_config: Callable[..., PretrainConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, out = tmp_path / "run", tmp_path / "encoders" / "tiny"
    pretrain(make_config("steps=3"))
    assert main(["export", str(run), str(out)]) == 0
    assert "encoder written to" in capsys.readouterr().out

    card = json.loads((out / "encoder.json").read_text())
    assert card["timm_name"] == "test_resnet" and card["in_chans"] == 1
    assert card["input_size"] == [1, 32, 32] and card["img_size"] == 32
    assert card["intensity_convention"] == intensity.CONVENTION
    assert card["pretext_tasks"] == {"simclr": 1.0, "metadata": 0.5}
    assert card["steps"] == 3 and card["images_seen"] == 3 * 8
    assert card["probes"]["step"] == 3 and "knn/body_part" in card["probes"]
    data = card["data"]
    assert data["counts"]["written"] == sum(split["samples"] for split in data["splits"].values())
    assert data["composition"]["body_part"]  # counts per class
    assert ".tar" not in json.dumps(card)  # counts only: no shard names, keys or paths

    readme = (out / "README.md").read_text()
    for heading in ("## Training", "## Probe scores", "## Intended use", "## Limitations", "## How to load"):
        assert heading in readme
    assert "| body_part |" in readme and "simclr (weight 1)" in readme

    # the exported weights are the run's final encoder, loadable by radpretrain and by plain timm
    trained = build_encoder("test_resnet", img_size=32)
    trained.load_state_dict(read_encoder_weights(run / "checkpoint"))
    trained.eval()
    x = torch.randn(2, 1, 32, 32)
    loaded = radpretrain.load_encoder(out)
    plain = timm.create_model("test_resnet", in_chans=1, num_classes=0, pretrained=False)
    plain.load_state_dict(load_file(str(out / "encoder.safetensors")), strict=True)
    plain.eval()
    with torch.no_grad():
        expected = trained(x)
        torch.testing.assert_close(loaded(x), expected)
        torch.testing.assert_close(plain(x), expected)


def test_export_refuses_bad_places(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "train_state.json").write_text('{"step": 1}')
    assert main(["export", str(run), str(run / "encoder")]) == 2
    assert "outside the run folder" in capsys.readouterr().err
