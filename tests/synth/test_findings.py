"""Lung findings in the synthetic archive: their share, the cohort table, their visibility, and no change without."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from radpretrain.cli import main
from radpretrain.data.cohorts import load_cohort
from radpretrain.errors import CohortError, ConfigError
from radpretrain.pretrain.probe import CohortProbe
from radpretrain.synth.archive import FINDINGS_COLUMNS, FINDINGS_CSV, SYNTH_JSON, SynthSummary, checksum, generate
from radpretrain.synth.phantoms import FINDING_MASK, FINDINGS, make_radiograph

SETTINGS = {"seed": 4, "masks": True, "min_size": 96, "max_size": 160, "progress": False}
N = 80

#: checksum() of `generate(OUT, 8, seed=1, min_size=32, max_size=48, syntaxes=["ExplicitVRLittleEndian"])`: the
#: bytes of every file, synth.json included, as the generator wrote them before findings existed. The demo, the
#: tests and the README's figures rely on the same seed giving the same bytes; if you change the phantoms or the
#: headers on purpose, say so in the commit and update this value.
DEFAULT_CHECKSUM = 0x7C56762C


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthSummary, SynthSummary]:
    """The same export without and with findings in half of its chest radiographs."""
    root = tmp_path_factory.mktemp("findings")
    return generate(root / "none", N, **SETTINGS), generate(root / "half", N, findings=0.5, **SETTINGS)


def chest_radiographs(summary: SynthSummary) -> list[str]:
    return [rel for rel, t in summary.files.items() if t["kind"] == "radiograph" and t["body_part"] == "chest"]


def stored_attenuation(path: Path) -> np.ndarray:
    """Modality-output values with higher = more attenuation, whatever the photometric interpretation."""
    ds = pydicom.dcmread(path)
    values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1))
    return values.max() - values if ds.PhotometricInterpretation == "MONOCHROME1" else values


def read_mask(root: Path, rel: str) -> np.ndarray:
    return cv2.imread(str(root / rel), cv2.IMREAD_UNCHANGED) > 0


def test_a_share_of_the_chest_radiographs_has_a_finding(pair: tuple[SynthSummary, SynthSummary]) -> None:
    _, half = pair
    chest = chest_radiographs(half)
    found = {rel: half.files[rel]["finding"] for rel in chest if half.files[rel]["finding"]}
    assert len(chest) >= 20 and len(found) == round(0.5 * len(chest))
    assert set(found.values()) == set(FINDINGS)
    # Only chest radiographs carry one; every other image file says so.
    others = [t for rel, t in half.files.items() if "body_part" in t and rel not in found]
    assert others and all(t["finding"] is None for t in others if t["kind"] != "duplicate")
    assert half.args["findings"] == 0.5
    # Frontal and lateral views, both sexes: the choice does not follow the header labels.
    views = {half.files[rel]["view"] for rel in found}
    assert "LAT" in views and views - {"LAT"}
    assert {half.files[rel]["sex"] for rel in found} >= {"M", "F"}


def test_the_findings_table_is_a_cohort_that_matches_synth_json(pair: tuple[SynthSummary, SynthSummary]) -> None:
    _, half = pair
    with open(half.root / FINDINGS_CSV, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == FINDINGS_COLUMNS
    assert [row["image"] for row in rows] == chest_radiographs(half)
    for row in rows:
        truth = half.files[row["image"]]
        assert row["finding"] == (truth["finding"] or "none")
        assert row["label"] == ("abnormal" if truth["finding"] else "normal")
        # The patient column is the synthetic (fake) PatientID, as in masks.csv.
        assert row["patient"] == truth["patient_id"] == pydicom.dcmread(half.root / row["image"]).PatientID
    cohort = load_cohort(half.root / FINDINGS_CSV)
    assert cohort.kind == "cls2d" and cohort.classes == ["abnormal", "normal"]
    assert [cohort.classes[case.target] for case in cohort.cases] == [row["label"] for row in rows]  # type: ignore[index]
    assert len(cohort.patients()) == len({row["patient"] for row in rows}) > 5
    probe = CohortProbe(half.root / FINDINGS_CSV, 32)  # what probe.cohort=... builds before a run
    assert (probe.classes, probe.patients, len(probe.cases)) == (2, len(cohort.patients()), len(rows))
    # With masks.csv beside it the export folder holds two tables: the folder alone is refused, naming both.
    with pytest.raises(CohortError, match=r"several cohort tables \(findings.csv, masks.csv\)"):
        load_cohort(half.root)


def test_the_finding_is_visible_and_nothing_else_changes(pair: tuple[SynthSummary, SynthSummary]) -> None:
    none, half = pair
    assert none.files.keys() == half.files.keys()
    contrast = []  # lesion minus the lung around it, as a share of the image's range
    for rel, truth in half.files.items():
        if not truth.get("finding"):
            # Findings have a generator of their own: every other file is byte for byte the export without them.
            assert (half.root / rel).read_bytes() == (none.root / rel).read_bytes(), rel
            continue
        lesion = read_mask(half.root, truth["masks"][FINDING_MASK])
        lungs = read_mask(half.root, truth["masks"]["lungs"])
        assert lesion.any() and (lesion & ~lungs).sum() <= 0.05 * lesion.sum()  # inside the lungs
        with_finding = stored_attenuation(half.root / rel)
        without = stored_attenuation(none.root / rel)
        # Denser than the lung around it (a small nodule over a rib crossing may hide: counted below) ...
        side = max(3, int(np.sqrt(lesion.sum())))
        ring = cv2.dilate(lesion.astype(np.uint8), np.ones((side, side), np.uint8)).astype(bool) & lungs & ~lesion
        spread = np.percentile(with_finding, 99) - np.percentile(with_finding, 1)
        contrast.append((with_finding[lesion].mean() - with_finding[ring].mean()) / spread)
        # ... because of the finding: the same image without it is fainter there and equal away from it.
        assert (with_finding - without)[lesion].mean() > 0.02 * spread, rel
        near = cv2.dilate(lesion.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        assert np.array_equal(with_finding[~near], without[~near]), rel
    assert len(contrast) >= 10
    assert np.mean(contrast) > 0.05 and np.mean(np.asarray(contrast) > 0.02) >= 0.8, np.round(contrast, 3)


def test_masks_csv_lists_the_finding_masks(pair: tuple[SynthSummary, SynthSummary]) -> None:
    none, half = pair
    structures = {row["structure"] for row in half.masks}
    assert structures == {row["structure"] for row in none.masks} | {FINDING_MASK}
    finding_rows = [row for row in half.masks if row["structure"] == FINDING_MASK]
    assert {row["image"] for row in finding_rows} == {rel for rel, t in half.files.items() if t.get("finding")}
    cohort = load_cohort(half.root / "masks.csv", structure=FINDING_MASK)
    assert cohort.kind == "seg2d" and len(cohort.cases) == len(finding_rows)


def test_no_findings_leaves_the_export_as_it_was(pair: tuple[SynthSummary, SynthSummary], tmp_path: Path) -> None:
    none, _ = pair
    assert not (none.root / FINDINGS_CSV).exists()
    saved = json.loads((none.root / SYNTH_JSON).read_text())
    assert "findings" not in saved["args"]
    assert all("finding" not in truth for truth in saved["files"].values())
    assert FINDING_MASK not in {row["structure"] for row in none.masks}
    small = {"seed": 1, "min_size": 32, "max_size": 48, "syntaxes": ["ExplicitVRLittleEndian"], "progress": False}
    for name, extra in (("default", {}), ("zero", {"findings": 0})):
        export = generate(tmp_path / name, 8, **small, **extra)
        assert checksum(export.root) == DEFAULT_CHECKSUM, f"{name}: the bytes changed (see DEFAULT_CHECKSUM)"


def test_the_phantom_draws_findings_in_the_lungs_only() -> None:
    for kind in FINDINGS:
        for view in ("PA", "LAT"):
            _, masks = make_radiograph("chest", 50, "F", 128, np.random.default_rng(0), view=view, finding=kind)
            lesion, lungs = masks[FINDING_MASK] > 0, masks["lungs"] > 0
            assert lesion.any() and (lesion & ~lungs).sum() <= 0.05 * lesion.sum(), (kind, view)
    with pytest.raises(ValueError, match="chest radiographs, not on 'hand'"):
        make_radiograph("hand", 50, "F", 64, np.random.default_rng(0), finding="nodule")
    with pytest.raises(ValueError, match="unknown finding 'nodle'; known: nodule, consolidation"):
        make_radiograph("chest", 50, "F", 64, np.random.default_rng(0), finding="nodle")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"findings": 1.5}, "findings must be a share between 0 and 1, got 1.5"),
        ({"findings": -0.1}, "findings must be a share between 0 and 1"),
        ({"findings": float("nan")}, "findings must be a share between 0 and 1"),
        ({"findings": 0.5, "body_parts": ["hand", "knee"]}, "add chest to --body-parts"),
        ({"findings": 0.5, "body_parts": ["hand", "chest"], "n": 1, "seed": 2}, "none of the 1 files is one"),
    ],
)
def test_bad_findings_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    kwargs = {"n": 5, "min_size": 32, "max_size": 48, "progress": False, **kwargs}
    with pytest.raises(ConfigError, match=message):
        generate(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_findings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--help"])
    assert exit_info.value.code == 0
    assert "--findings P" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", str(tmp_path / "bad"), "--findings", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "expected a number between 0 and 1, got 2.0" in err[-1]
    out = tmp_path / "cli"
    args = ["synth", str(out), "--n", "12", "--seed", "2", "--min-size", "32", "--max-size", "48"]
    args += ["--body-parts", "chest"]
    assert main([*args, "--findings", "0.25"]) == 0
    summary = SynthSummary.load(out)
    assert sum(1 for t in summary.files.values() if t["finding"]) == round(0.25 * 12)
    assert (out / FINDINGS_CSV).is_file()
    assert main([*args, "--findings", "0.5"]) == 2  # other arguments than the export in OUT
    assert "--overwrite" in capsys.readouterr().err
