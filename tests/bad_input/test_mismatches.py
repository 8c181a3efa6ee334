"""Inputs that exist but do not fit each other: encoder vs data, ViT patch vs size, masks vs images, labels vs pool."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from radpretrain.models.encoders import CARD_FILE, WEIGHTS_FILE, build_encoder, save_encoder

from .helpers import Sandbox, refused

FINETUNE = ["size=32", "epochs=1", "batch_size=4", "cpu=true", "progress=false"]


def _lungs(lung_cohort: Path) -> list[dict[str, str]]:
    with lung_cohort.open() as handle:
        return [row for row in csv.DictReader(handle) if row["structure"] == "lungs"]


def _write_table(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "mask", "patient"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_finetune_refuses_an_encoder_of_another_intensity_convention(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, lung_cohort: Path, pretrained_encoder: Path
) -> None:
    foreign = sandbox.root / "foreign-encoder"
    shutil.copytree(pretrained_encoder, foreign)
    card = json.loads((foreign / CARD_FILE).read_text())
    (foreign / CARD_FILE).write_text(json.dumps({**card, "intensity_convention": "imagenet-rgb-v1"}))
    out = sandbox.root / "ft"
    args = ["finetune", f"cohort={lung_cohort}", "structure=lungs", f"out={out}", *FINETUNE]
    with sandbox.only_writes(watch=[foreign, lung_cohort.parent]):
        message = refused(capsys, *args, f"encoder={foreign}", "strategy=full")
        assert message == (
            f"encoder {foreign} uses intensity convention 'imagenet-rgb-v1' but this version expects "
            f"'{card['intensity_convention']}'; re-export the encoder or re-shard the data with this version of "
            "radpretrain"
        )
        # The same folder as a deep-weight-prior source is refused too.
        message = refused(capsys, *args, f"encoder={pretrained_encoder}", "strategy=dwp", f"dwp.sources=[{foreign}]")
        assert "uses intensity convention 'imagenet-rgb-v1'" in message
    # Weights that do not match their card (a partial copy) are named as such.
    (foreign / CARD_FILE).write_text(json.dumps(card))
    weights = foreign / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with sandbox.only_writes(watch=[foreign, lung_cohort.parent]):
        message = refused(capsys, *args, f"encoder={foreign}", "strategy=full")
    assert message == f"{weights} does not match the checksum in {CARD_FILE} (corrupt or replaced); export again"
    assert not out.exists()


def test_vit_sizes_that_are_not_a_multiple_of_the_patch(
    capsys: pytest.CaptureFixture[str],
    sandbox: Sandbox,
    lung_cohort: Path,
    tiny_shards: Path,
    tiny_run: Callable[..., list[str]],
) -> None:
    run = sandbox.root / "run"
    hint = "it cuts images into 16 px patches, so the size must be a multiple of 16, e.g. 32 or 48"
    with sandbox.only_writes(run, watch=[tiny_shards, lung_cohort.parent]):
        # vit_tiny has a strict input size, so timm itself would crop a 40 px image to 32 without a word.
        for name in ("test_vit", "vit_tiny_patch16_224"):
            message = refused(capsys, *tiny_run(run, f"encoder.name={name}", "data.image_size=40"))
            assert message == f"encoder '{name}' cannot take 40 px inputs: {hint} (data.image_size for pretrain, " + (
                "size for finetune)"
            )
        out = sandbox.root / "ft"
        args = ["finetune", f"cohort={lung_cohort}", "structure=lungs", f"out={out}", *FINETUNE]
        message = refused(capsys, *args, "encoder=test_vit", "strategy=random", "size=40")
        assert message.startswith(f"encoder 'test_vit' cannot take 40 px inputs: {hint}")
    assert not (run / "checkpoint").exists() and not out.exists()


def test_finetune_size_must_be_the_fixed_size_of_an_exported_vit(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, lung_cohort: Path
) -> None:
    vit = sandbox.root / "vit"
    save_encoder(build_encoder("test_vit", img_size=32), vit, {"pretext_tasks": {"mae": 1.0}})
    out = sandbox.root / "ft"
    with sandbox.only_writes(watch=[vit, lung_cohort.parent]):
        args = [f"cohort={lung_cohort}", "structure=lungs", f"encoder={vit}", f"out={out}", *FINETUNE[1:]]
        message = refused(capsys, "finetune", *args)  # size left at its default, 224
    assert message == (
        f"encoder {vit} has a fixed input size of 32 px but size=224; set size=32 (or export an encoder built for "
        "this size)"
    )


def test_masks_that_do_not_match_their_images(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, lung_cohort: Path
) -> None:
    root = lung_cohort.parent
    rows = [{**row, "image": str(root / row["image"])} for row in _lungs(lung_cohort)]
    masks = sandbox.root / "masks"
    masks.mkdir()
    for i, row in enumerate(rows):
        mask = cv2.imread(str(root / row["mask"]), cv2.IMREAD_GRAYSCALE)
        if i == 2:  # a mask saved at half resolution by another tool
            mask = cv2.resize(mask, (mask.shape[1] // 2, mask.shape[0] // 2), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(masks / f"mask{i}.png"), mask)
        row["mask"] = str(masks / f"mask{i}.png")
    table = _write_table(sandbox.root / "cohort.csv", rows)
    out = sandbox.root / "ft"
    args = ["finetune", f"cohort={table}", "encoder=test_resnet", "strategy=random", f"out={out}", *FINETUNE]
    with sandbox.only_writes(out, watch=[root]):
        message = refused(capsys, *args, "test_fraction=0", "val_fraction=0")
    image = Path(rows[2]["image"]).stem
    assert message.startswith(f"case {image}: mask shape (")
    assert message.endswith("masks must match their image pixel for pixel")

    (masks / "mask2.png").unlink()  # a mask that never arrived
    with sandbox.only_writes(out, watch=[root]):
        message = refused(capsys, *args)
    assert message == f"case {image}: its mask file is missing"


def test_pair_folders_with_a_mask_but_no_image(capsys: pytest.CaptureFixture[str], sandbox: Sandbox) -> None:
    cohort = sandbox.root / "pairs"
    cohort.mkdir()
    rng = np.random.default_rng(0)
    for case in ("case1", "case2", "case3"):
        cv2.imwrite(str(cohort / f"{case}.png"), rng.integers(0, 255, (40, 40), dtype=np.uint8))
        cv2.imwrite(str(cohort / f"{case}-mask.png"), (rng.random((40, 40)) > 0.5).astype(np.uint8) * 255)
    (cohort / "case2.png").rename(cohort / "case2.jpeg.bak")  # the image was renamed away
    out = sandbox.root / "ft"
    with sandbox.only_writes(watch=[cohort]):
        message = refused(capsys, "finetune", f"cohort={cohort}", "encoder=test_resnet", "strategy=random", *FINETUNE)
    assert message == "case case2: its mask has no image beside it (expected e.g. case2.png or .nrrd)"
    assert not out.exists()


def test_label_counts_larger_than_the_pool(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, lung_cohort: Path, pretrained_encoder: Path
) -> None:
    out = sandbox.root / "sweep"
    sweep = [
        "sweep",
        f"finetune.cohort={lung_cohort}",
        "finetune.structure=lungs",
        f"finetune.encoder={pretrained_encoder}",
        "test_count=10",
        f"out={out}",
    ]
    with sandbox.only_writes(watch=[lung_cohort.parent, pretrained_encoder]):
        message = refused(capsys, *sweep, "label_counts=[5, 40, 100]", "strategies=[random, full]")
        assert message.startswith("label count(s) [40, 100] exceed the pool of ")
        assert message.endswith("lower label_counts or test_count/test_fraction")
        message = refused(
            capsys, "finetune", f"cohort={lung_cohort}", "structure=lungs", "n_train=500", *FINETUNE[:2], "cpu=true"
        )
        assert message.startswith("label count 500 is larger than the pool of ")
    assert not out.exists()


def test_a_bad_case_in_a_file_named_by_its_dicom_uid_is_named_by_its_row(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, lung_cohort: Path
) -> None:
    # PACS exports often name files by SOPInstanceUID; such a name must not reach a message.
    root = lung_cohort.parent
    rows = [{**row, "image": str(root / row["image"]), "mask": str(root / row["mask"])} for row in _lungs(lung_cohort)]
    uid = re.compile(r"[0-9]+(\.[0-9]+){3,}")
    named = next(i for i, row in enumerate(rows) if uid.fullmatch(Path(row["image"]).stem))
    mask = cv2.imread(rows[named]["mask"], cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(sandbox.root / "small.png"), mask[::2, ::2])
    rows[named]["mask"] = str(sandbox.root / "small.png")
    table = _write_table(sandbox.root / "cohort.csv", rows)
    out = sandbox.root / "ft"
    args = ["finetune", f"cohort={table}", "encoder=test_resnet", "strategy=random", f"out={out}", *FINETUNE]
    with sandbox.only_writes(out, watch=[root]):
        message = refused(capsys, *args, "test_fraction=0", "val_fraction=0")
    assert message.startswith(f"case row{named + 2}: mask shape (")  # row 1 is the header
    assert not uid.search(message)
    uid_named = [row for row in rows if uid.fullmatch(Path(row["image"]).stem)][1:]
    table = _write_table(sandbox.root / "uid-named.csv", uid_named)
    args = ["finetune", f"cohort={table}", "encoder=test_resnet", "strategy=random", f"out={out}", *FINETUNE]
    with sandbox.only_writes(out, watch=[root]):  # DICOM files read as volumes want volume masks
        message = refused(capsys, *args, "kind=seg3d", "test_fraction=0", "val_fraction=0")
    assert message in {f"case row{n}: label volumes must be NRRD or NIfTI files" for n in range(2, len(uid_named) + 2)}
