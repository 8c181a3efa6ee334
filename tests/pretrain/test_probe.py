"""Probes a reviewer can trust: a downstream cohort probe by patient folds, trained_on marks and honest card notes."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radpretrain.errors import ConfigError
from radpretrain.pretrain import monitor
from radpretrain.pretrain.checkpoint import TrainState, model_card
from radpretrain.pretrain.config import PretrainConfig
from radpretrain.pretrain.loop import pretrain, write_summary
from radpretrain.pretrain.probe import CohortProbe, cross_validate

MakeConfig = Callable[..., PretrainConfig]
METRICS = ("auroc", "balanced_accuracy")
COHORT_KEYS = tuple(f"{kind}_{metric}/cohort" for kind in ("knn", "linear") for metric in METRICS)


@pytest.fixture(scope="module")
def cls_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CSV classification cohort: 24 PNGs of 12 patients, a bright block on the left (normal) or right (lesion)."""
    root = tmp_path_factory.mktemp("cls-cohort")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        label = "lesion" if i % 2 else "normal"
        image = rng.integers(0, 60, (48, 48)).astype(np.uint8)
        cols = slice(28, 44) if label == "lesion" else slice(4, 20)
        image[12:36, cols] = 230
        Image.fromarray(image).save(root / f"img{i:02d}.png")
        rows.append({"image": f"img{i:02d}.png", "label": label, "patient": f"p{i // 2:02d}"})
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "labels.csv"


def test_cohort_probe_scores_frozen_features_by_patient_folds(cls_cohort: Path) -> None:
    from accelerate import Accelerator

    from radpretrain.models.encoders import build_encoder

    accelerator = Accelerator(cpu=True)
    probe = CohortProbe(cls_cohort, 32, folds=5, k=3, batch_size=8)
    assert (probe.classes, probe.patients, probe.folds) == (2, 12, 5)
    encoder = build_encoder("test_resnet", img_size=32)
    encoder.train()
    scores = probe.score(accelerator, encoder)
    assert encoder.training  # the probe restores the mode it found
    for key in COHORT_KEYS:
        assert 0.0 <= scores[key] <= 1.0, key
    # a block on the left vs on the right: even random conv features separate it
    assert scores["linear_auroc/cohort"] > 0.8 and scores["linear_balanced_accuracy/cohort"] > 0.7
    assert scores["cohort_cases"] == 24 and scores["cohort_patients"] == 12 and scores["cohort_folds"] == 5


def test_cross_validation_keeps_each_patient_in_one_fold() -> None:
    # Features identify the patient, labels are random per patient: with case-level folds a kNN would find the
    # same patient's other image and score ~1.0; patient-level folds leave nothing to find (chance).
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(60), 2)
    identity = rng.normal(size=(60, 16))[patients] + 0.01 * rng.normal(size=(120, 16))
    labels = rng.integers(0, 2, 60)[patients]
    scores = cross_validate(identity, labels, patients.astype(str), k=1, folds=5)
    assert abs(scores["knn_auroc/cohort"] - 0.5) < 0.2 and abs(scores["knn_balanced_accuracy/cohort"] - 0.5) < 0.2
    # the same features do carry the label when it follows them: the probe is not blind
    informative = rng.normal(size=(120, 16)) + 3.0 * labels[:, None]
    scores = cross_validate(informative, labels, patients.astype(str), k=5, folds=3)
    assert scores["knn_auroc/cohort"] > 0.95 and scores["linear_balanced_accuracy/cohort"] > 0.9


def test_cross_validation_handles_three_classes_and_fewer_patients_than_folds() -> None:
    rng = np.random.default_rng(2)
    labels = np.array([0, 1, 2] * 4)
    x = rng.normal(size=(12, 8)) + 4.0 * np.eye(3)[labels] @ rng.normal(size=(3, 8))
    scores = cross_validate(x, labels, np.array([f"p{i}" for i in range(12)]), k=3, folds=20)
    assert scores["linear_auroc/cohort"] > 0.8


def test_bad_cohorts_are_refused_in_one_line(tmp_path: Path, cls_cohort: Path) -> None:
    with pytest.raises(ConfigError, match=r"probe\.cohort=.*does not exist"):
        CohortProbe(tmp_path / "missing", 32)
    one_patient = tmp_path / "one.csv"
    rows = [line.rsplit(",", 1)[0] for line in cls_cohort.read_text().splitlines()[1:]]
    one_patient.write_text("image,label,patient\n" + "".join(f"{cls_cohort.parent}/{row},p0\n" for row in rows))
    with pytest.raises(ConfigError, match="one patient; patient-level cross-validation needs two"):
        CohortProbe(one_patient, 32)


def test_runs_mark_the_labels_their_tasks_trained_on(make_config: MakeConfig, tmp_path: Path, cls_cohort: Path) -> None:
    from radpretrain.pretrain.checkpoint import export_encoder

    run = tmp_path / "both"
    result = pretrain(make_config("steps=2", f"probe.cohort={cls_cohort}", "probe.folds=3", out=run))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["probe_labels"] == {
        "body_part": {"trained_on": True},
        "age_bucket": {"trained_on": True},
        "cohort": {"trained_on": False, "name": "labels.csv"},
    }
    for key in COHORT_KEYS:
        assert 0.0 <= result.probe[key] <= 1.0
    assert summary["probe"]["cohort_folds"] == 3 and str(cls_cohort.parent) not in json.dumps(summary)
    card = (export_encoder(run, tmp_path / "enc") / "README.md").read_text()
    assert "| body_part |" in card and "| yes |" in card and "measure that training, not transfer" in card
    assert "Downstream cohort `labels.csv`" in card and "| logistic regression |" in card

    simclr = tmp_path / "simclr"
    pretrain(make_config("steps=2", "tasks={simclr: 1.0}", out=simclr))
    marks = json.loads((simclr / "summary.json").read_text())["probe_labels"]
    assert marks == {"body_part": {"trained_on": False}, "age_bucket": {"trained_on": False}}
    # a metadata task trained on sex only marks sex
    sex = tmp_path / "sex"
    pretrain(
        make_config(
            "steps=1",
            "tasks={simclr: 1.0, metadata: 0.5}",
            "task_options={metadata: {labels: [sex]}}",
            "probe.labels=[body_part, sex]",
            out=sex,
        )
    )
    marks = json.loads((sex / "summary.json").read_text())["probe_labels"]
    assert marks == {"body_part": {"trained_on": False}, "sex": {"trained_on": True}}


def test_a_probe_without_two_classes_says_so(make_config: MakeConfig, tmp_path: Path) -> None:
    cfg = make_config()
    probe = {"step": 6, "train_samples": 64, "val_samples": 32}  # what run_probes returns when nothing is scored
    summary: dict = {}
    write_summary(tmp_path, cfg, {}, TrainState(step=6), summary, probe, ["body_part"])
    note = summary["probe_note"]
    assert "no probe label has two classes" in note and "body_part, age_bucket" in note
    card = {
        "input_size": [1, 32, 32],
        "pretext_tasks": {"simclr": 1.0},
        "steps": 6,
        "images_seen": 48,
        "seed": 0,
        "probes": probe,
        "probe_labels": summary["probe_labels"],
        "probe_note": note,
        "radpretrain_version": "0",
    }
    text = model_card(card, "test_resnet")
    assert "no probe label has two classes" in text and "stopped before" not in text
    # a later probe that scores clears the note; a run that never probed still says it stopped first
    scored = {**probe, "knn/body_part": 0.5, "knn/age_bucket": 0.4}
    write_summary(tmp_path, cfg, {}, TrainState(step=7), summary, scored, [])
    assert "probe_note" not in summary
    assert "stopped before its end-of-training probe" in model_card({**card, "probes": {}}, "test_resnet")
    assert monitor.probe_note(["body_part", "sex"], {"step": 1, "knn/body_part": 0.9}) == (
        "not scored: sex (fewer than two classes among the probed images)"
    )


def test_probe_folds_below_two_are_refused(make_config: MakeConfig) -> None:
    with pytest.raises(ConfigError, match=r"probe\.folds must be >= 2"):
        make_config("probe.folds=1")
