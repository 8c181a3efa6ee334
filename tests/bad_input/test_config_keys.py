"""Mistyped config keys, wrong value types and broken config files: refused before any work, with a suggestion."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from .helpers import Sandbox, refused

# (command and overrides, fragments the one error line must hold); the test adds valid inputs and out=OUT.
CASES = [
    (
        ["pretrain", "optim.lrr=1"],
        ["unknown config key 'optim.lrr' (command line).", "Did you mean 'lr'?", "Known here: accumulation, betas"],
    ),
    (["pretrain", "stepz=10"], ["unknown config key 'stepz'", "Did you mean 'steps'?"]),
    (["pretrain", "data.batchsize=8"], ["unknown config key 'data.batchsize'", "Did you mean 'batch_size'?"]),
    (["pretrain", "steps=ten"], ["config key 'steps' must be an integer, got 'ten'"]),
    (["pretrain", "optim.lr=fast"], ["config key 'optim.lr' must be a number, got 'fast'"]),
    (["pretrain", "precision=fp8"], ["config key 'precision' must be one of 'no', 'bf16', 'fp16', got 'fp8'"]),
    (["pretrain", "data=64"], ["config key 'data' is a section; give it keys, e.g. data.<name>=..."]),
    (
        ["pretrain", "tasks={simclar: 1.0}"],
        ["Unknown task 'simclar'. Did you mean 'simclr'?", "Known: barlow_twins, byol, dino, mae"],
    ),
    (["pretrain", "steps"], ["override 'steps' must look like key=value"]),
    # Used only by the probe at the end of training: checked before the first step all the same.
    (["pretrain", "probe.labels=[bodypart]"], ["unknown probe label 'bodypart'", "Did you mean 'body_part'?"]),
    (["finetune", "epoch=3"], ["unknown config key 'epoch'", "Did you mean 'epochs'?"]),
    (["finetune", "optim.learning_rate=1e-3"], ["unknown config key 'optim.learning_rate'"]),
    (["finetune", "n_train=five"], ["config key 'n_train' must be an integer, got 'five'"]),
    (["finetune", "strategy=ful"], ["Unknown strategy 'ful'. Did you mean 'full'?"]),
    (["finetune", "kind=seg4d"], ["config key 'kind' must be one of 'seg2d', 'cls2d', 'seg3d', 'cls3d', got 'seg4d'"]),
    (["sweep", "label_count=[5]"], ["unknown config key 'label_count'", "Did you mean 'label_counts'?"]),
    (["sweep", "finetune.epoch=2"], ["unknown config key 'finetune.epoch'", "Did you mean 'epochs'?"]),
    (["sweep", "label_counts=five"], ["config key 'label_counts' must be a list, got 'five' (write [a, b])"]),
    (["sweep", "label_counts=[5, ten]"], ["config key 'label_counts[1]' must be an integer, got 'ten'"]),
    (["sweep", "repeats=0"], ["repeats must be >= 1, got 0"]),
    (["sweep", "strategies=[ful]"], ["Unknown strategy 'ful'. Did you mean 'full'?"]),
]


@pytest.mark.parametrize(("argv", "fragments"), CASES, ids=[" ".join(argv) for argv, _ in CASES])
def test_config_mistakes_are_refused_before_any_work(
    capsys: pytest.CaptureFixture[str],
    sandbox: Sandbox,
    lung_cohort: Path,
    tiny_shards: Path,
    argv: list[str],
    fragments: list[str],
) -> None:
    command, overrides = argv[0], argv[1:]
    out = sandbox.root / "out"
    inputs = {
        "pretrain": [f"data.shards={tiny_shards}", "encoder.name=test_resnet", "data.image_size=32"],
        "finetune": [f"cohort={lung_cohort}", "structure=lungs", "encoder=test_resnet", "strategy=random"],
        "sweep": [
            f"finetune.cohort={lung_cohort}",
            "finetune.structure=lungs",
            "finetune.encoder=test_resnet",
            "label_counts=[2]",
        ],
    }[command]
    with sandbox.only_writes(watch=[tiny_shards, lung_cohort.parent]):
        message = refused(capsys, command, *inputs, f"out={out}", *overrides)
    for fragment in fragments:
        assert fragment in message
    assert not out.exists()


def test_demo_keys_and_types(capsys: pytest.CaptureFixture[str], sandbox: Sandbox) -> None:
    out = sandbox.root / "demo"
    with sandbox.only_writes():
        message = refused(capsys, "demo", out, "filez=300")
        assert "unknown config key 'filez' (command line). Did you mean 'files'?" in message
        assert refused(capsys, "demo", out, "files=many") == "config key 'files' must be an integer, got 'many'"
        message = refused(capsys, "demo", out, "strategies=full")
        assert message == "config key 'strategies' must be a list, got 'full' (write [a, b])"
    assert not out.exists()


def test_config_files_that_are_missing_broken_or_not_a_mapping(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, tiny_run: Callable[..., list[str]]
) -> None:
    broken = sandbox.root / "broken.yaml"
    broken.write_text("steps: [1\n  optim:\n    lr: 3e-4\n")
    listed = sandbox.root / "listed.yaml"
    listed.write_text("- steps: 10\n- optim.lr: 3e-4\n")
    typo = sandbox.root / "typo.yaml"
    typo.write_text("optim:\n  lr: 3e-4\n  wamrup: 10\n")
    out = sandbox.root / "run"
    with sandbox.only_writes():
        message = refused(capsys, "pretrain", sandbox.root / "missing.yaml", f"out={out}")
        assert message == f"config file not found: {sandbox.root / 'missing.yaml'}"
        message = refused(capsys, "pretrain", broken, f"out={out}")
        assert message.startswith(f"config file {broken} is not valid YAML: ")  # and on one line
        message = refused(capsys, "finetune", listed, f"out={out}")
        assert message == f"config file {listed} must hold a mapping of keys to values, got list"
        message = refused(capsys, "sweep", typo, f"out={out}")
        assert message.startswith(f"unknown config key 'optim' ({typo}). Known here:")
        message = refused(capsys, "pretrain", typo, f"out={out}")
        assert f"unknown config key 'optim.wamrup' ({typo}). Did you mean 'warmup'?" in message
    assert not out.exists()


def test_mistyped_names_in_grids_and_options_fail_before_any_cell_runs(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, lung_cohort: Path, tiny_shards: Path
) -> None:
    out = sandbox.root / "sweep"
    sweep = [
        "sweep",
        f"finetune.cohort={lung_cohort}",
        "finetune.structure=lungs",
        "strategies=[random]",
        "label_counts=[2]",
        f"out={out}",
    ]
    sheet = sandbox.root / "sheet.txt"
    with sandbox.only_writes(watch=[lung_cohort.parent, tiny_shards]):
        message = refused(capsys, *sweep, "encoders=[test_resnet, resnet18x]")
        assert message.startswith("Unknown encoder 'resnet18x'. Did you mean 'resnet18'?")
        message = refused(capsys, *sweep, "encoders=[model:unett]")
        assert message == "Unknown model 'unett'. Did you mean 'unet'? Known: meshnet, resunet, unet"
        message = refused(capsys, *sweep, "finetune.model=meshnett")
        assert message.startswith("Unknown model 'meshnett'. Did you mean 'meshnet'?")
        message = refused(capsys, "inspect", tiny_shards, "--sheet", sheet)
        assert message == "the contact sheet must be a .png or .jpg file, got 'sheet.txt'; e.g. --sheet sheet.png"
    assert not out.exists()


def test_report_refuses_a_baseline_that_is_not_in_the_results(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox
) -> None:
    results = sandbox.root / "sweep" / "results.jsonl"
    results.parent.mkdir()
    rows = [
        {"cell": f"{s}|n5|r{r}", "status": "ok", "strategy": s, "encoder": "e", "n_labels": 5, "repeat": r}
        | {"metrics": {"dice": d}}
        for s, base in (("random", 0.5), ("full", 0.7))
        for r, d in enumerate((base, base + 0.05, base - 0.02))
    ]
    results.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with sandbox.only_writes():
        message = refused(capsys, "report", results, "--baseline", "randm", "--flips", "50")
    assert message == (
        "baseline 'randm' has no runs in the results. Did you mean 'random'? Strategies there: full, random"
    )
