"""Existing weights into an encoder: timm hub folders, .bin state dicts, bare safetensors and exported encoders,
built locally with timm (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models._hub import save_for_hf

from radpretrain.errors import ConfigError
from radpretrain.models.encoders import build_encoder, save_encoder
from radpretrain.models.weights import describe_weights, init_encoder_from


def rgb_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A three-channel timm model with a classifier, as ImageNet checkpoints are, with seeded weights."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def assert_arrived(encoder: torch.nn.Module, source: dict[str, torch.Tensor], stem: str) -> None:
    mine = encoder.state_dict()
    # The one-channel stem is the sum over the three input channels (timm's adapt_input_conv for in_chans=1).
    torch.testing.assert_close(mine[stem], source[stem].sum(dim=1, keepdim=True))
    for key, value in mine.items():
        if key != stem:
            assert torch.equal(value, source[key]), key


@pytest.mark.parametrize("safe", [True, False], ids=["model.safetensors", "pytorch_model.bin"])
def test_timm_hub_folder_loads_with_the_stem_folded_and_the_head_dropped(tmp_path: Path, safe: bool) -> None:
    source = rgb_model("test_resnet")
    folder = tmp_path / "test_resnet.r160_in1k"
    save_for_hf(source, str(folder), safe_serialization=safe)
    assert json.loads((folder / "config.json").read_text())["architecture"] == "test_resnet"
    weights = describe_weights(folder)
    assert weights.kind == "timm" and weights.architecture == "test_resnet"
    assert weights.file.name == ("model.safetensors" if safe else "pytorch_model.bin")

    encoder = build_encoder("test_resnet")
    info = init_encoder_from(encoder, folder)
    assert info["format"] == "timm" and info["architecture"] == "test_resnet"
    assert info["folded"] == ["conv1.0.weight"] and info["dropped"] == ["fc.bias", "fc.weight"]
    assert info["tensors"] == len(encoder.state_dict())
    assert_arrived(encoder, tensors(source), "conv1.0.weight")
    assert encoder(torch.randn(2, 1, 32, 32)).shape == (2, encoder.num_features)


def test_bare_files_load_and_a_file_without_an_architecture_is_matched_by_keys(tmp_path: Path) -> None:
    source = rgb_model("test_resnet", seed=1)
    state = tensors(source)
    named = tmp_path / "named.safetensors"
    save_file(state, str(named), metadata={"architecture": "test_resnet.r160_in1k"})
    bare = tmp_path / "bare.safetensors"
    save_file(state, str(bare))
    pickled = tmp_path / "checkpoint.pth"
    # A training checkpoint: the weights under "state_dict" with DDP's "module." prefix.
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, pickled)
    assert describe_weights(named).architecture == "test_resnet.r160_in1k"
    assert describe_weights(bare).architecture is None
    for path in (named, bare, pickled):
        encoder = build_encoder("test_resnet")
        info = init_encoder_from(encoder, path)
        assert info["format"] in ("safetensors", "torch") and info["folded"] == ["conv1.0.weight"]
        assert_arrived(encoder, state, "conv1.0.weight")


def test_exported_radpretrain_encoder_loads_exactly(tmp_path: Path) -> None:
    torch.manual_seed(3)
    exported = build_encoder("test_resnet")
    with torch.no_grad():
        for p in exported.parameters():
            p.mul_(1.5)
    save_encoder(exported, tmp_path / "encoder", {"pretext_tasks": {"none": 1.0}})
    encoder = build_encoder("test_resnet")
    info = init_encoder_from(encoder, tmp_path / "encoder")
    assert info["format"] == "radpretrain" and info["folded"] == [] and info["dropped"] == []
    torch.testing.assert_close(encoder.state_dict(), exported.state_dict())
    # The safetensors file of an export stands for its folder (checksum and convention checked there).
    assert describe_weights(tmp_path / "encoder" / "encoder.safetensors").kind == "radpretrain"


def test_vit_position_embeddings_follow_the_encoder_size(tmp_path: Path) -> None:
    source = rgb_model("test_vit")
    folder = tmp_path / "vit"
    save_for_hf(source, str(folder), safe_serialization=True)
    encoder = build_encoder("test_vit", img_size=64)
    info = init_encoder_from(encoder, folder)
    assert info["folded"] == ["patch_embed.proj.weight"] and "head.weight" in info["dropped"]
    assert encoder.pos_embed.shape != source.pos_embed.shape  # resized by timm's own checkpoint filter
    torch.testing.assert_close(
        encoder.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(dim=1, keepdim=True).detach()
    )
    assert encoder(torch.randn(1, 1, 64, 64)).shape == (1, encoder.num_features)


def test_another_architecture_is_refused_in_one_line_naming_both(tmp_path: Path) -> None:
    folder = tmp_path / "r18"
    save_for_hf(timm.create_model("resnet18", pretrained=False), str(folder), safe_serialization=True)
    encoder = build_encoder("test_resnet")
    before = tensors(encoder)
    with pytest.raises(ConfigError) as info:
        init_encoder_from(encoder, folder)
    message = str(info.value)
    assert "\n" not in message and "are for 'resnet18', the encoder is 'test_resnet'" in message
    # A file that does not name its architecture: the keys say it does not fit, counted, not dumped.
    bare = tmp_path / "r18.safetensors"
    save_file(tensors(timm.create_model("resnet18", pretrained=False)), str(bare))
    with pytest.raises(ConfigError) as info:
        init_encoder_from(encoder, bare)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600
    assert "do not fit the 'test_resnet' encoder" in message and "missing" in message and "more" in message
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key  # nothing loaded on refusal


def test_unreadable_and_unsupported_weights_give_config_errors(tmp_path: Path) -> None:
    encoder = build_encoder("test_resnet")
    with pytest.raises(ConfigError, match="do not exist"):
        init_encoder_from(encoder, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"neither encoder\.json"):
        init_encoder_from(encoder, tmp_path / "empty")
    hf = tmp_path / "rad-dino"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "dinov2", "architectures": ["Dinov2Model"]}))
    with pytest.raises(ConfigError, match=r"names no timm 'architecture'.*dinov2"):
        init_encoder_from(encoder, hf)
    only_config = tmp_path / "no-weights"
    only_config.mkdir()
    (only_config / "config.json").write_text(json.dumps({"architecture": "test_resnet"}))
    with pytest.raises(ConfigError, match=r"no weights; expected model\.safetensors or pytorch_model\.bin"):
        init_encoder_from(encoder, only_config)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read as weights"):
        init_encoder_from(encoder, junk)
    text = tmp_path / "notes.txt"
    text.write_text("weights")
    with pytest.raises(ConfigError, match="not a weights file radpretrain reads"):
        init_encoder_from(encoder, text)


def test_a_dinov2_layout_file_loads_through_timms_own_conversion(tmp_path: Path) -> None:
    # RAD-DINO's `backbone_compatible.safetensors` uses the DINOv2 repository's layout: timm's keys plus a
    # mask_token, which timm's ViT checkpoint filter removes (without it the key would be refused as unexpected).
    source = rgb_model("test_vit", seed=2)
    state = {k: v.contiguous() for k, v in tensors(source).items() if not k.startswith("head.")}
    state["mask_token"] = torch.zeros(1, source.embed_dim)
    path = tmp_path / "backbone_compatible.safetensors"
    save_file(state, str(path))
    encoder = build_encoder("test_vit", img_size=64)
    info = init_encoder_from(encoder, path)
    assert info["format"] == "safetensors" and info["architecture"] is None and info["dropped"] == []
    assert torch.equal(encoder.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
