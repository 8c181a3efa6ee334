"""Export formats: a Hugging Face / timm folder that timm and radpretrain load, and ONNX that matches torch."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

import radpretrain
from radpretrain import intensity
from radpretrain.cli import main
from radpretrain.errors import ConfigError
from radpretrain.models.encoders import build_encoder
from radpretrain.models.export import export
from radpretrain.pretrain import checkpoint


def make_run(root: Path, name: str = "test_resnet", size: int = 32) -> tuple[Path, nn.Module]:
    """A run folder as `radpretrain pretrain` leaves it (config, train state, accelerate's model file)."""
    run = root / "run"
    (run / checkpoint.CHECKPOINT).mkdir(parents=True)
    (run / checkpoint.CONFIG_FILE).write_text(f"encoder:\n  name: {name}\ndata:\n  image_size: {size}\nsteps: 4\n")
    (run / checkpoint.CHECKPOINT / checkpoint.STATE_FILE).write_text(json.dumps({"step": 4, "images": 32}))
    torch.manual_seed(0)
    encoder = build_encoder(name, img_size=size)
    with torch.no_grad():  # non-default batchnorm statistics, so a loader that drops buffers is caught
        for module in encoder.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    tensors = {checkpoint.ENCODER_PREFIX + k: v.contiguous() for k, v in encoder.state_dict().items()}
    tensors["head.weight"] = torch.zeros(2, 2)  # a pretext head's tensor, which no export may carry
    save_file(tensors, str(run / checkpoint.CHECKPOINT / checkpoint.MODEL_FILE))
    return run, encoder.eval()


@pytest.mark.parametrize(("name", "size"), [("test_resnet", 32), ("test_vit", 32), ("cbr_tiny", 64)])
def test_hf_folder_loads_with_timm_and_radpretrain(tmp_path: Path, name: str, size: int) -> None:
    run, trained = make_run(tmp_path, name, size)
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out), "--format", "hf"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "encoder.json", "model.safetensors"]

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == 0
    assert config["num_features"] == trained.num_features
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [1, size, size] and cfg["num_classes"] == 0
    assert cfg["mean"] == [intensity.MEAN] and cfg["std"] == [intensity.STD]
    assert f"intensity_convention={intensity.CONVENTION}" in cfg["notes"]
    assert config["intensity_convention"] == intensity.CONVENTION

    readme = (out / "README.md").read_text()
    assert readme.startswith("---\n")
    meta = yaml.safe_load(readme.split("---\n")[1])
    assert meta["library_name"] == "timm" and meta["license"] == "other" and "radiograph" in meta["tags"]
    assert "local-dir:" in readme and "## Training" in readme and "encoder.safetensors" not in readme

    x = torch.randn(3, 1, size, size)
    via_timm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert list(via_timm.pretrained_cfg["mean"]) == [intensity.MEAN]
    via_radpretrain = radpretrain.load_encoder(out)
    with torch.no_grad():
        expected = trained(x)
        torch.testing.assert_close(via_timm(x), expected)
        torch.testing.assert_close(via_radpretrain(x), expected)


def test_onnx_matches_torch_on_any_batch_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx
    import onnxruntime

    run, trained = make_run(tmp_path)
    out = tmp_path / "onnx"
    assert main(["export", str(run), str(out), "--format", "onnx"]) == 0
    assert "onnxruntime matches torch" in capsys.readouterr().out
    graph = onnx.load(str(out / "encoder.onnx"))
    assert {p.key: p.value for p in graph.metadata_props}["intensity_convention"] == intensity.CONVENTION
    session = onnxruntime.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 1, 32, 32)
        got = session.run(["features"], {"image": x.numpy()})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), trained(x), atol=1e-4, rtol=1e-4)
    # the folder is also radpretrain's own, and its card documents the ONNX file
    with torch.no_grad():
        x = torch.randn(2, 1, 32, 32)
        torch.testing.assert_close(radpretrain.load_encoder(out)(x), trained(x))
    assert "## ONNX" in (out / "README.md").read_text()


def test_default_format_is_unchanged(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    out = tmp_path / "plain"
    assert main(["export", str(run), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "encoder.json", "encoder.safetensors"]


def test_missing_packages_and_bad_options_fail_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = make_run(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    assert main(["export", str(run), str(tmp_path / "o"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime" in err and "radpretrain[export]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert main(["export", str(run), str(tmp_path / "h"), "--format", "hf", "--push-to-hub", "me/enc"]) == 2
    assert "huggingface_hub" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "h"), "--push-to-hub", "me/enc"]) == 2
    assert "--format hf" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "h"), "--format", "hff"]) == 2
    assert "Did you mean 'hf'" in capsys.readouterr().err
    assert main(["export", str(run), str(run / "hf"), "--format", "hf"]) == 2
    assert "outside the run folder" in capsys.readouterr().err


def test_push_to_hub_uploads_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict]] = []

    class FakeApi:  # stands in for huggingface_hub.HfApi: nothing leaves the machine in tests
        def create_repo(self, **kwargs: object) -> str:
            calls.append(("create_repo", kwargs))
            return f"https://hub.example/{kwargs['repo_id']}"

        def upload_folder(self, **kwargs: object) -> None:
            files = sorted(p.name for p in Path(str(kwargs["folder_path"])).iterdir())
            calls.append(("upload_folder", {**kwargs, "files": files}))

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=FakeApi))
    run, _ = make_run(tmp_path)
    result = export(run, tmp_path / "hf", format="hf", push_to_hub="team/enc", private=True)
    assert result.pushed_to == "https://hub.example/team/enc"
    assert calls[0] == ("create_repo", {"repo_id": "team/enc", "repo_type": "model", "private": True, "exist_ok": True})
    name, upload = calls[1]
    assert name == "upload_folder" and upload["repo_id"] == "team/enc"
    assert upload["files"] == ["README.md", "config.json", "encoder.json", "model.safetensors"]

    class RefusingApi(FakeApi):
        def create_repo(self, **kwargs: object) -> str:
            raise RuntimeError("401 Client Error: Unauthorized\nmore detail")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=RefusingApi))
    with pytest.raises(ConfigError, match=r"upload to hub repo 'team/enc' failed \(401 Client Error: Unauthorized\)"):
        export(run, tmp_path / "hf2", format="hf", push_to_hub="team/enc")
    assert (tmp_path / "hf2" / "model.safetensors").is_file()  # the folder is kept for a later upload
