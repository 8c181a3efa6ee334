"""Encoders: every documented name builds with one channel, stages partition the parameters, export round-trips."""

from __future__ import annotations

import hashlib
import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from radpretrain import intensity
from radpretrain.errors import ConfigError
from radpretrain.models.encoders import (
    CARD_FILE,
    ENCODERS,
    WEIGHTS_FILE,
    build_encoder,
    encoder_stages,
    load_encoder,
    read_card,
    save_encoder,
)


@pytest.mark.parametrize("name", ENCODERS)
def test_documented_encoder_builds_with_one_channel(name: str) -> None:
    torch.manual_seed(0)
    encoder = build_encoder(name, in_chans=1, img_size=64).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        pooled = encoder(x)
        maps = encoder.forward_intermediates(x, intermediates_only=True)
    assert pooled.shape == (2, encoder.num_features)
    assert torch.isfinite(pooled).all()
    assert len(maps) == len(encoder.feature_info)
    for fmap, info in zip(maps, encoder.feature_info, strict=True):
        assert fmap.ndim == 4 and fmap.shape[0] == 2
        assert fmap.shape[1] == info["num_chs"]
        assert fmap.shape[-1] == 64 // info["reduction"]
    # the input layer takes exactly one channel
    first = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "cbr_small"])
def test_stages_partition_the_parameters_input_side_first(name: str) -> None:
    encoder = build_encoder(name, img_size=64)
    stages = encoder_stages(encoder)
    assert len(stages) >= 4

    def stage_of(param: str) -> list[int]:
        return [i for i, prefixes in enumerate(stages) for p in prefixes if param == p or param.startswith(p + ".")]

    names = [n for n, _ in encoder.named_parameters()]
    for param in names:
        assert len(stage_of(param)) == 1, param
    assert stage_of(names[0]) == [0]
    assert stage_of(names[-1]) == [len(stages) - 1]
    # buffers (batch-norm statistics) follow their module's stage
    for buffer, _ in encoder.named_buffers():
        if buffer.endswith("running_mean"):
            assert len(stage_of(buffer)) == 1, buffer


def _trained_a_little(name: str) -> nn.Module:
    torch.manual_seed(1)
    encoder = build_encoder(name, img_size=64)
    encoder.train()
    with torch.no_grad():
        encoder(torch.randn(4, 1, 64, 64) * 2 + 1)  # moves batch-norm statistics away from their defaults
    return encoder.eval()


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "cbr_tiny"])
def test_save_load_round_trip_and_plain_timm(name: str, tmp_path) -> None:
    encoder = _trained_a_little(name)
    save_encoder(encoder, tmp_path / "enc", {"tasks": {"simclr": 1.0}, "steps": 3, "input_size": [1, 64, 64]})
    card = read_card(tmp_path / "enc")
    assert card["timm_name"] == name and card["in_chans"] == 1
    assert card["intensity_convention"] == intensity.CONVENTION
    assert card["tasks"] == {"simclr": 1.0} and card["steps"] == 3
    loaded = load_encoder(tmp_path / "enc")
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(encoder(x), loaded(x))

    kwargs = {"img_size": 64} if card["img_size"] and "vit" in name else {}
    plain = timm.create_model(name, in_chans=1, num_classes=0, pretrained=False, **kwargs).eval()
    plain.load_state_dict(load_file(str(tmp_path / "enc" / WEIGHTS_FILE)), strict=True)
    with torch.no_grad():
        assert torch.equal(encoder(x), plain(x))


def test_missing_corrupt_and_mismatched_files_give_config_errors(tmp_path) -> None:
    encoder = _trained_a_little("test_resnet")
    folder = tmp_path / "enc"
    save_encoder(encoder, folder, {})
    weights = folder / WEIGHTS_FILE
    card_path = folder / CARD_FILE
    good_weights = weights.read_bytes()
    good_card = card_path.read_text()

    with pytest.raises(ConfigError, match=r"no encoder\.json"):
        load_encoder(tmp_path / "elsewhere")

    weights.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(ConfigError, match="checksum"):
        load_encoder(folder)

    # a truncated file whose checksum was updated still fails, inside safetensors
    card = json.loads(good_card)
    card["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    card_path.write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        load_encoder(folder)

    weights.write_bytes(good_weights)
    card = json.loads(good_card)
    card["timm_name"] = "cbr_tiny"
    card_path.write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="does not fit a 'cbr_tiny' encoder"):
        load_encoder(folder)

    card_path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_encoder(folder)

    card = json.loads(good_card)
    card["intensity_convention"] = "raw-hu"
    card_path.write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="intensity convention"):
        load_encoder(folder / CARD_FILE)

    weights.unlink()
    card_path.write_text(good_card)
    with pytest.raises(ConfigError, match="missing"):
        load_encoder(folder)


def test_bad_names_and_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'resnet18'"):
        build_encoder("resnet_18")
    with pytest.raises(ConfigError, match="pretrained"):
        build_encoder("resnet18", pretrained=True)
    with pytest.raises(ConfigError, match="in_chans"):
        build_encoder("resnet18", in_chans=0)


def test_card_may_not_override_reserved_keys(tmp_path) -> None:
    encoder = build_encoder("cbr_small")
    with pytest.raises(ValueError, match="timm_name"):
        save_encoder(encoder, tmp_path, {"timm_name": "resnet18"})
    plain = timm.create_model("cbr_small", in_chans=1, num_classes=0)
    with pytest.raises(ConfigError, match="build_encoder"):
        save_encoder(plain, tmp_path, {})
