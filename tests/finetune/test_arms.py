"""Transfer arms: random init, an archive-pretrained encoder and a local timm checkpoint in one sweep grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models._hub import save_for_hf

from radpretrain.cli import main
from radpretrain.data.cohorts import load_cohort
from radpretrain.errors import ConfigError
from radpretrain.finetune.build import build_model, parse_encoder
from radpretrain.finetune.config import FinetuneConfig, SweepConfig
from radpretrain.finetune.sweep import check_cells, labeled_cases, split_test


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A three-channel test_resnet with a 1000-class head saved as timm's hub folder (what a downloaded
    `timm/...` model folder holds), standing in for ImageNet weights on disk."""
    torch.manual_seed(7)
    model = timm.create_model("test_resnet", pretrained=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("weights") / "test_resnet.r160_in1k"
    save_for_hf(model, str(folder), safe_serialization=True)
    return folder, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_encoder_settings_parse_into_named_arms(tmp_path: Path) -> None:
    assert parse_encoder("resnet18") == parse_encoder("resnet18")
    plain = parse_encoder("resnet18")
    assert (plain.label, plain.source, plain.architecture, plain.is_path) == ("resnet18", "resnet18", None, False)
    arm = parse_encoder("imagenet=resnet50@/w/r50.safetensors")
    assert (arm.label, arm.source, arm.architecture, arm.is_path) == (
        "imagenet",
        "/w/r50.safetensors",
        "resnet50",
        True,
    )
    assert parse_encoder("scratch=resnet50").source == "resnet50"
    folder = parse_encoder("runs/a/encoder")
    assert folder.label == "runs/a/encoder" and folder.is_path  # reports show its last part, as before
    odd = tmp_path / "run=3@x"
    odd.mkdir()
    assert parse_encoder(str(odd)).source == str(odd)  # an existing path is taken whole


def test_timm_checkpoint_and_bare_file_arms_build_with_their_weights(
    lung_cohort, imagenet_like, tmp_path: Path
) -> None:
    folder, source = imagenet_like
    cohort = load_cohort(lung_cohort, structure="lungs")
    cfg = FinetuneConfig(cohort=lung_cohort, structure="lungs", encoder=f"imagenet={folder}", size=32, cpu=True)
    built = build_model(cfg, cohort)
    stem = built.model.encoder.conv1[0].weight
    torch.testing.assert_close(stem, source["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(built.model.encoder.layer2[0].conv1.weight, source["layer2.0.conv1.weight"])
    assert built.extra["init"]["format"] == "timm" and built.extra["init"]["dropped"] == ["fc.bias", "fc.weight"]

    bare = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(bare))
    with pytest.raises(ConfigError, match=r"does not say which architecture.*write the encoder as ARCH@"):
        build_model(FinetuneConfig(encoder=str(bare), size=32, cpu=True), cohort)
    built = build_model(FinetuneConfig(encoder=f"mine=test_resnet@{bare}", size=32, cpu=True), cohort)
    assert torch.equal(built.model.encoder.layer2[0].conv1.weight, source["layer2.0.conv1.weight"])
    with pytest.raises(ConfigError, match="are for 'test_resnet', the encoder is 'resnet18'"):
        build_model(FinetuneConfig(encoder=f"resnet18@{folder}", size=32, cpu=True), cohort)


def test_a_sweep_compares_random_archive_and_imagenet_arms(
    lung_cohort, pretrained_encoder, imagenet_like, tmp_path: Path
) -> None:
    folder, _ = imagenet_like
    out = tmp_path / "sweep"
    args = [
        "sweep",
        f"finetune.cohort={lung_cohort}",
        "finetune.structure=lungs",
        "finetune.size=32",
        "finetune.epochs=1",
        "finetune.batch_size=4",
        "finetune.cpu=true",
        "finetune.progress=false",
        "label_counts=[4]",
        "repeats=1",
        "strategies=[random, full]",
        f"encoders=[archive={pretrained_encoder}, imagenet={folder}]",
        "test_count=8",
        "keep_cells=false",
        f"out={out}",
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["encoder"], r["strategy"]) for r in rows} == {
        (arm, strategy) for arm in ("archive", "imagenet") for strategy in ("random", "full")
    }
    assert {r["config"]["encoder"] for r in rows} == {f"archive={pretrained_encoder}", f"imagenet={folder}"}
    by_arm = {(r["encoder"], r["strategy"]): r["metrics"]["dice"] for r in rows}
    # The two pretrained arms start from different weights; random is the same architecture from He init.
    assert by_arm[("archive", "full")] != by_arm[("imagenet", "full")]
    report = (out / "report.md").read_text()
    for arm in ("random [archive]", "full [archive]", "random [imagenet]", "full [imagenet]"):
        assert f"| {arm} |" in report, arm


def test_arms_that_a_report_could_not_tell_apart_are_refused(lung_cohort, pretrained_encoder, tmp_path: Path) -> None:
    # Two exported folders both called `encoder` (runs/a/encoder, runs/b/encoder) would merge in the report.
    copy = tmp_path / "b" / "encoder"
    shutil.copytree(pretrained_encoder, copy)
    cfg = SweepConfig(
        finetune=FinetuneConfig(cohort=lung_cohort, structure="lungs", size=32),
        label_counts=[4],
        strategies=["full"],
        encoders=[str(pretrained_encoder), str(copy)],
    )
    cohort = load_cohort(lung_cohort, structure="lungs")
    pool, _ = split_test(labeled_cases(cohort), count=8)
    with pytest.raises(ConfigError, match="would both be reported as 'encoder'; name the arms"):
        check_cells(cfg, cohort, pool)
    cfg.encoders = [f"a={pretrained_encoder}", f"b={copy}"]
    check_cells(cfg, cohort, pool)
    cfg.encoders = [f"a={pretrained_encoder}", "b=missing/folder"]
    with pytest.raises(ConfigError, match="encoder folder missing/folder does not exist"):
        check_cells(cfg, cohort, pool)
