"""Sweeps end to end (2D synthetic lungs, real 3D volumes), resume, patient-level splits, early refusals."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from radpretrain.cli import main
from radpretrain.config import load_config, to_dict
from radpretrain.data.cohorts import Case
from radpretrain.errors import CohortError, ConfigError
from radpretrain.finetune import loop, report, sweep
from radpretrain.finetune.config import SweepConfig

from .conftest import SHARED_DATA


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def counted(monkeypatch) -> list[str]:
    """Record the strategy of every cell the sweep trains from now on (it still trains them)."""
    trained: list[str] = []
    real = loop.train_and_evaluate

    def train_and_evaluate(cfg, *args, **kwargs):
        trained.append(cfg.strategy)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(loop, "train_and_evaluate", train_and_evaluate)
    return trained


def test_lung_sweep_runs_pairs_and_resumes(lung_cohort, pretrained_encoder, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    args = [
        "sweep",
        f"finetune.cohort={lung_cohort}",
        "finetune.structure=lungs",
        f"finetune.encoder={pretrained_encoder}",
        "finetune.size=32",
        "finetune.epochs=2",
        "finetune.batch_size=4",
        "finetune.cpu=true",
        "finetune.progress=false",
        "label_counts=[4, 8]",
        "repeats=2",
        "strategies=[random, full, transfusion:1]",
        "test_count=8",
        "keep_cells=false",
        f"out={out}",
    ]
    assert main(args) == 0
    rows = lines(out / "results.jsonl")
    assert len(rows) == 12 and len({r["cell"] for r in rows}) == 12
    assert {r["strategy"] for r in rows} == {"random", "full", "transfusion:1"}
    # One fixed test set; each (label count, repeat) is one subset and seed shared by all strategies.
    (n_test,) = {r["n_test"] for r in rows}
    assert n_test >= 8  # whole patients until at least test_count cases
    for n in (4, 8):
        for repeat in (0, 1):
            seeds = {r["seed"] for r in rows if r["n_labels"] == n and r["repeat"] == repeat}
            assert len(seeds) == 1
            assert {r["n_train"] + r["n_val"] for r in rows if r["n_labels"] == n and r["repeat"] == repeat} == {n}
    assert all(0.0 <= r["metrics"]["dice"] <= 1.0 and r["seconds"]["train"] > 0 for r in rows)
    assert "| random |" in (out / "report.md").read_text() and (out / "learning_curve.png").is_file()
    # Tiny label counts train on every case for a fixed schedule; the test outputs are kept case by case.
    assert {r["selection"] for r in rows} == {"fixed schedule (n < 30)"} and {r["n_val"] for r in rows} == {0}
    assert len({r["test_set"] for r in rows}) == 1
    assert all(len(r["per_case"]["dice"]) == len(r["per_case"]["patients"]) == n_test for r in rows)
    text = (out / "report.md").read_text()
    assert "[95% test-set interval]" in text and "- n=4: fixed schedule (n < 30)" in text

    # Resume: a rerun finds nothing to do; a cell whose line was lost (killed mid-write) is redone alone.
    trained = counted(monkeypatch)
    assert main(args) == 0
    assert len(lines(out / "results.jsonl")) == 12 and trained == []
    text = (out / "results.jsonl").read_text().splitlines()
    lost = json.loads(text[5])["cell"]
    (out / "results.jsonl").write_text("\n".join(text[:5] + text[6:]) + "\n" + text[5][:40])
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.endswith("}")]
    assert len(rows) == 12 and rows[-1]["cell"] == lost and len(trained) == 1
    # Resuming with settings that change what a cell measures is refused; how it runs may change.
    with pytest.raises(ConfigError, match=r"other settings \(finetune\.epochs: 2 -> 3\)"):
        sweep.run_sweep(load_config(SweepConfig, None, [*args[1:], "finetune.epochs=3"]))
    assert main([*args, "finetune.workers=0", "finetune.progress=true"]) == 0


def test_volume_sweep_on_real_3d_data(pretrained_encoder, tmp_path):
    volumes = SHARED_DATA / "volumes-3d"
    assert volumes.is_dir(), f"the shared real data is expected at {volumes}"
    cfg = load_config(
        SweepConfig,
        None,
        [
            f"finetune.cohort={volumes}",
            f"finetune.encoder={pretrained_encoder}",
            "finetune.size=32",
            "finetune.epochs=1",
            "finetune.batch_size=2",
            "finetune.cpu=true",
            "finetune.progress=false",
            "label_counts=[1, 2]",
            "repeats=1",
            "strategies=[random, full]",
            "test_count=1",
            f"out={tmp_path}",
        ],
    )
    rows = lines(sweep.run_sweep(cfg))
    assert len(rows) == 4 and {r["kind"] for r in rows} == {"seg3d"}
    assert {r["n_test"] for r in rows} == {1} and sorted({r["n_train"] for r in rows}) == [1, 2]
    assert all(0.0 <= r["metrics"]["dice"] <= 1.0 for r in rows)
    # Cells keep their run folders; a 3D run saves the model but no 2D encoder folder.
    cell = next((tmp_path / "cells").iterdir())
    assert (cell / "metrics.json").is_file() and (cell / "model.safetensors").is_file()
    assert not (cell / "encoder").exists()


def test_grids_that_cannot_run_are_refused_before_any_cell(lung_cohort, pretrained_encoder, tmp_path):
    base = [
        f"finetune.cohort={lung_cohort}",
        "finetune.structure=lungs",
        f"finetune.encoder={pretrained_encoder}",
        f"out={tmp_path}",
        "test_count=8",
        "label_counts=[4]",
    ]
    cfg = load_config(SweepConfig, None, [*base, "label_counts=[4, 500]"])
    with pytest.raises(CohortError, match=r"label count\(s\) \[500\] exceed the pool of \d+ case"):
        sweep.run_sweep(cfg)
    assert not (tmp_path / "results.jsonl").exists()
    with pytest.raises(ConfigError, match="Did you mean 'lp-ft'"):
        sweep.run_sweep(load_config(SweepConfig, None, [*base, "strategies=[random, lpft]"]))
    with pytest.raises(ConfigError, match=r"set finetune\.weak\.cohort"):
        sweep.run_sweep(load_config(SweepConfig, None, [*base, "strategies=[weak+full]"]))
    with pytest.raises(CohortError, match="choose one with structure=NAME"):
        sweep.run_sweep(load_config(SweepConfig, None, [f"finetune.cohort={lung_cohort}", f"out={tmp_path}"]))
    assert main(["sweep", f"finetune.cohort={lung_cohort}", "label_counts=[0]"]) == 2


def cases(patients: int, per: int) -> list[Case]:
    return [Case(f"p{p}-{i}", f"p{p}", None, 0) for p in range(patients) for i in range(per)]  # type: ignore[arg-type]


def test_splits_are_patient_level_seeded_and_exact():
    everyone = cases(10, 3)
    pool, test = sweep.split_test(everyone, count=6, seed=1)
    assert len(test) == 6 and len(pool) == 24
    assert {c.patient for c in pool}.isdisjoint({c.patient for c in test})
    assert sweep.split_test(everyone, count=6, seed=1) == (pool, test)
    assert sweep.split_test(everyone, count=6, seed=2) != (pool, test)
    labeled = sweep.draw_labeled(pool, 5, seed=sweep.subset_seed(0, 5, 0))
    assert len(labeled) == 5 and len({c.id for c in labeled}) == 5 and set(labeled) <= set(pool)
    # Patient by patient: at most one patient is cut short.
    per_patient = {p: sum(c.patient == p for c in labeled) for p in {c.patient for c in labeled}}
    assert sorted(per_patient.values())[1:] == [3] * (len(per_patient) - 1)
    repeats = {tuple(c.id for c in sweep.draw_labeled(pool, 5, seed=sweep.subset_seed(0, 5, r))) for r in range(4)}
    assert len(repeats) > 1
    with pytest.raises(CohortError, match="label count 25 is larger than the pool of 24"):
        sweep.draw_labeled(pool, 25, seed=0)
    with pytest.raises(CohortError, match="leaves nothing to train on"):
        sweep.split_test(cases(1, 5), count=2)


def test_resuming_compares_the_settings_the_saved_sweep_has(tmp_path):
    def cfg(*overrides: str) -> SweepConfig:
        return load_config(SweepConfig, None, ["finetune.epochs=2", f"out={tmp_path}", *overrides])

    saved = tmp_path / "sweep.yaml"
    values = to_dict(cfg())
    del values["finetune"]["size"]  # a setting added to radpretrain after this sweep ran: not a change
    saved.write_text(yaml.safe_dump(values))
    sweep.check_same_settings(saved, cfg("finetune.size=96"))
    sweep.check_same_settings(saved, cfg("finetune.workers=3", "finetune.progress=false"))  # how cells run
    with pytest.raises(ConfigError, match=r"other settings \(seed: 0 -> 1; finetune\.epochs: 2 -> 3\)"):
        sweep.check_same_settings(saved, cfg("finetune.epochs=3", "seed=1"))


def test_non_finite_scores_reach_the_results_as_they_are(lung_cohort, tmp_path, monkeypatch):
    # HD95 of an empty prediction is not finite: the run keeps it, the results line holds it, the report counts it.
    real = loop.task_metrics
    monkeypatch.setattr(loop, "task_metrics", lambda *args: {**real(*args), "hd95": math.inf, "iou": math.nan})
    cfg = load_config(
        SweepConfig,
        None,
        [
            f"finetune.cohort={lung_cohort}",
            "finetune.structure=lungs",
            "finetune.encoder=test_resnet",
            "finetune.size=32",
            "finetune.epochs=1",
            "finetune.cpu=true",
            "finetune.progress=false",
            "label_counts=[3]",
            "repeats=1",
            "strategies=[random]",
            "test_count=4",
            "keep_cells=false",
            f"out={tmp_path}",
        ],
    )
    results = sweep.run_sweep(cfg)
    assert "Infinity" in results.read_text() and "NaN" in results.read_text()
    (row,) = lines(results)
    assert row["metrics"]["hd95"] == math.inf and math.isnan(row["metrics"]["iou"])
    (cell,) = report.summarize(report.read_results(results), "hd95", resamples=10)
    assert (cell.runs, cell.failed) == (1, 1)
