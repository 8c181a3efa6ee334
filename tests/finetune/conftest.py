"""Shared finetune fixtures: small synthetic cohorts made by the project's generator, and exported encoders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from radpretrain.models.encoders import build_encoder, save_encoder

#: The real public volumes (pyradiomics test data); in CI at ../shared/data relative to the repo root.
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def synth_chest(tmp_path_factory) -> Path:
    """40 small chest radiographs (about 9 patients) with lung and heart masks: OUT/masks.csv."""
    from radpretrain.synth.archive import generate

    out = tmp_path_factory.mktemp("synth-chest")
    generate(out, 40, seed=1, masks=True, min_size=64, max_size=96, body_parts=["chest"], progress=False)
    return out


@pytest.fixture(scope="session")
def lung_cohort(synth_chest) -> Path:
    return synth_chest / "masks.csv"


@pytest.fixture(scope="session")
def weak_lung_cohort(synth_chest, tmp_path_factory) -> Path:
    """Weak labels of the same task: each lung mask replaced by the filled bounding boxes of its lungs."""
    out = tmp_path_factory.mktemp("weak-lungs")
    rows = []
    with (synth_chest / "masks.csv").open() as handle:
        for row in csv.DictReader(handle):
            if row["structure"] != "lungs":
                continue
            mask = cv2.imread(str(synth_chest / row["mask"]), cv2.IMREAD_GRAYSCALE)
            count, _labels, stats, _ = cv2.connectedComponentsWithStats((mask > 127).astype(np.uint8))
            boxes = np.zeros_like(mask)
            for x, y, w, h, _area in stats[1:count]:
                boxes[y : y + h, x : x + w] = 255
            name = Path(row["mask"]).name.replace(".png", "_box.png")
            cv2.imwrite(str(out / name), boxes)
            rows.append({"image": str(synth_chest / row["image"]), "mask": name, "patient": row["patient"]})
    table = out / "boxes.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "mask", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    return table


@pytest.fixture(scope="session")
def body_part_cohort(tmp_path_factory) -> Path:
    """A classification cohort: chest vs hand radiographs, labels from the generator's ground truth."""
    from radpretrain.synth.archive import generate

    out = tmp_path_factory.mktemp("synth-parts")
    generate(out, 24, seed=2, min_size=64, max_size=96, body_parts=["chest", "hand"], progress=False)
    truth = json.loads((out / "synth.json").read_text())["files"]
    table = out / "labels.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "patient"])
        for rel, info in sorted(truth.items()):
            if info["kind"] == "radiograph":
                writer.writerow([rel, info["body_part"], info["patient_id"]])
    return table


@pytest.fixture(scope="session")
def pretrained_encoder(tmp_path_factory) -> Path:
    """An exported test_resnet (weights moved off their initialisation, standing in for pretraining)."""
    torch.manual_seed(0)
    encoder = build_encoder("test_resnet")
    with torch.no_grad():
        for p in encoder.parameters():
            p.mul_(1.0 + 0.1 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("encoder") / "encoder"
    save_encoder(encoder, out, {"pretext_tasks": {"none": 1.0}, "input_size": 32})
    return out


@pytest.fixture(scope="session")
def finetuned_run(lung_cohort, pretrained_encoder, tmp_path_factory) -> tuple[Path, Path]:
    """(encoder before, encoder after) of a short full finetune on the lung cohort."""
    from radpretrain.finetune.config import FinetuneConfig
    from radpretrain.finetune.sweep import run_finetune

    out = tmp_path_factory.mktemp("finetuned")
    cfg = FinetuneConfig(
        cohort=lung_cohort,
        structure="lungs",
        encoder=str(pretrained_encoder),
        strategy="full",
        size=32,
        epochs=2,
        batch_size=4,
        n_train=8,
        cpu=True,
        out=out,
        progress=False,
    )
    run_finetune(cfg)
    return pretrained_encoder, out / "encoder"
