"""Missing, misplaced and wrong-kind paths given to every command: one clear line, a non-zero exit, nothing written."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from .helpers import Sandbox, process_error, refused, run_process


def _text_folder(root: Path) -> Path:
    notes = root / "notes"
    (notes / "sub").mkdir(parents=True)
    for i in range(3):
        (notes / f"note{i}.txt").write_text(f"follow-up in {i} weeks\n")
    (notes / "sub" / "README").write_text("not an image\n")
    return notes


def test_shard_source_missing_or_a_file(capsys: pytest.CaptureFixture[str], sandbox: Sandbox) -> None:
    out, key = sandbox.root / "shards", sandbox.root / "deid.key"
    afile = sandbox.root / "export.zip"
    afile.write_bytes(b"PK\x03\x04")
    with sandbox.only_writes():
        message = refused(capsys, "shard", sandbox.root / "missing", out, "--key", key)
        assert "does not exist" in message and "give the folder of your DICOM export" in message
        message = refused(capsys, "index", sandbox.root / "missing", out, "--key", key)
        assert "does not exist" in message
        message = refused(capsys, "shard", afile, out, "--key", key)
        assert "is not a folder" in message


def test_shard_a_folder_without_dicoms_says_so_in_a_fresh_process(sandbox: Sandbox) -> None:
    notes = _text_folder(sandbox.root)
    out, key = sandbox.root / "shards", sandbox.root / "keys" / "deid.key"
    # The key file and the private folder beside OUT are what `shard` documents writing outside OUT.
    with sandbox.only_writes(key.parent, sandbox.root / "shards.private"):
        done = run_process(sandbox, "shard", notes, out, "--key", key, "--no-progress")
    message = process_error(done)
    assert done.returncode == 2
    assert "holds 4 files but none is a DICOM file or a PNG/JPEG image" in message
    assert not out.exists()


def test_inspect_and_pretrain_need_a_manifest(
    capsys: pytest.CaptureFixture[str],
    sandbox: Sandbox,
    tiny_shards: Path,
    tiny_run: Callable[..., list[str]],
) -> None:
    empty = sandbox.root / "empty"
    empty.mkdir()
    unfinished = sandbox.root / "unfinished"
    unfinished.mkdir()
    shutil.copy(next(tiny_shards.glob("train-*.tar")), unfinished)
    run = sandbox.root / "run"
    with sandbox.only_writes(watch=[tiny_shards]):
        assert "no manifest.json in" in refused(capsys, "inspect", sandbox.root / "missing")
        assert "make shards with `radpretrain shard SRC OUT`" in refused(capsys, "inspect", empty)
        assert "has not finished" in refused(capsys, "inspect", unfinished)
        assert "no manifest.json" in refused(capsys, *tiny_run(run, shards=sandbox.root / "missing"))
        assert "has not finished" in refused(capsys, *tiny_run(run, shards=unfinished))
        message = refused(capsys, *tiny_run(run, "data.shards=null"))
        assert "data.shards is not set" in message
    assert not run.exists()


def test_export_of_something_that_is_not_a_run(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, tiny_shards: Path
) -> None:
    out = sandbox.root / "encoder"
    with sandbox.only_writes(watch=[tiny_shards]):
        for run in (sandbox.root / "missing", tiny_shards):
            message = refused(capsys, "export", run, out)
            assert "holds no checkpoint" in message and "radpretrain pretrain" in message
    assert not out.exists()


def test_finetune_sweep_and_analyze_without_a_cohort(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, pretrained_encoder: Path
) -> None:
    missing = sandbox.root / "cohort.csv"
    notes = _text_folder(sandbox.root)
    common = [f"encoder={pretrained_encoder}", "size=32", "epochs=1", "cpu=true"]
    with sandbox.only_writes(watch=[pretrained_encoder]):
        message = refused(capsys, "finetune", f"cohort={missing}", *common, f"out={sandbox.root / 'ft'}")
        assert message == "the cohort path does not exist; give a cohort folder or CSV file"
        message = refused(capsys, "finetune", *common, f"out={sandbox.root / 'ft'}")
        assert "no cohort given; set cohort=" in message
        message = refused(capsys, "finetune", f"cohort={notes}", *common, f"out={sandbox.root / 'ft'}")
        assert "no cohort layout fits this folder; expected one of" in message
        message = refused(capsys, "sweep", f"finetune.cohort={missing}", f"out={sandbox.root / 'sweep'}")
        assert "the cohort path does not exist" in message
        message = refused(
            capsys,
            "analyze",
            "--before",
            pretrained_encoder,
            "--after",
            sandbox.root / "missing-encoder",
            "--cohort",
            missing,
            "--out",
            sandbox.root / "analysis",
        )
        assert "no encoder.json in" in message


def test_report_without_results(capsys: pytest.CaptureFixture[str], sandbox: Sandbox) -> None:
    sweep = sandbox.root / "sweep"
    sweep.mkdir()
    with sandbox.only_writes():
        message = refused(capsys, "report", sweep)
    assert "results file not found" in message and "run `radpretrain sweep CONFIG` first" in message
    (sweep / "results.jsonl").write_text('{"cell": "random/5/0", "metr')  # torn by a crash mid-write
    with sandbox.only_writes():
        assert refused(capsys, "report", sweep).endswith("results.jsonl holds no results yet")
    (sweep / "results.jsonl").write_text("cell,metric\nrandom/5/0,0.5\n")  # a CSV under the wrong name
    with sandbox.only_writes():
        assert refused(capsys, "report", sweep).endswith("results.jsonl line 1 is not JSON; remove the line and rerun")
    assert sorted(p.name for p in sweep.iterdir()) == ["results.jsonl"]


def test_an_output_path_that_is_a_file(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, tiny_shards: Path, tiny_run: Callable[..., list[str]]
) -> None:
    taken = sandbox.root / "taken"
    taken.write_text("a file the user already has\n")
    with sandbox.only_writes(watch=[tiny_shards]):
        message = refused(capsys, *tiny_run(taken), code=1)
        assert message == f"{taken} is a file where a folder is needed; give a folder path"
        message = refused(capsys, *tiny_run(taken / "run"), code=1)
        assert message == f"part of {taken / 'run'} is a file where a folder is needed; give a folder path"
    assert taken.read_text() == "a file the user already has\n"


def test_files_that_are_not_what_their_name_says(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, lung_cohort: Path, tiny_shards: Path
) -> None:
    binary = bytes(range(256)) * 4  # no text encoding reads this
    config = sandbox.root / "pretrain.yaml"
    config.write_bytes(binary)
    cohort_rows = lung_cohort.read_text().replace("PAT", str(lung_cohort.parent / "PAT"))
    utf16 = sandbox.root / "cohort-utf16.csv"
    utf16.write_text(cohort_rows, encoding="utf-16")
    semicolons = sandbox.root / "cohort-semicolons.csv"
    semicolons.write_text(cohort_rows.replace(",", ";"))
    results = sandbox.root / "sweep" / "results.jsonl"
    results.parent.mkdir()
    results.write_bytes(binary + b"\n")
    shards = sandbox.root / "shards"
    shutil.copytree(tiny_shards, shards)
    (shards / "manifest.json").write_bytes(binary)
    out = sandbox.root / "out"
    finetune = ["finetune", "encoder=test_resnet", "strategy=random", "structure=lungs", f"out={out}"]
    with sandbox.only_writes():
        message = refused(capsys, "pretrain", config, f"out={out}")
        assert message == f"config file {config} is not UTF-8 text; give a YAML file (see configs/)"
        message = refused(capsys, *finetune, f"cohort={utf16}")
        assert message == (
            "cohort-utf16.csv is not UTF-8 text (UTF-16, or not a CSV at all?); save it as 'CSV UTF-8 (comma "
            "delimited)'"
        )
        message = refused(capsys, *finetune, f"cohort={semicolons}")
        assert message.startswith("cohort-semicolons.csv has no 'image' column (columns: image;mask;patient;structure)")
        assert message.endswith("its columns are separated by ';', save it with commas")
        assert refused(capsys, "report", results.parent) == f"{results} line 1 is not JSON; remove the line and rerun"
        message = refused(capsys, "inspect", shards)
        assert message.startswith(f"{shards / 'manifest.json'} is not valid JSON (")
        assert message.endswith("run `radpretrain shard` again to rewrite it")
    assert not out.exists()


def test_shard_options_that_would_write_in_the_wrong_place_or_select_nothing(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, synth_chest: Path
) -> None:
    out, key = sandbox.root / "shards", sandbox.root / "keys" / "deid.key"
    args = ["shard", synth_chest, out, "--no-progress"]
    with sandbox.only_writes(key.parent, watch=[synth_chest]):
        message = refused(capsys, *args, "--key", key, "--private-dir", synth_chest / "private")
        assert message == "the private folder must not be inside the source folder; choose --private-dir elsewhere"
        message = refused(capsys, *args, "--key", key, "--private-dir", out / "private")
        assert message == "the private folder must not be inside the output folder; choose --private-dir elsewhere"
        message = refused(capsys, *args, "--key", out / "deid.key")
        assert message.startswith(f"the de-identification key {out / 'deid.key'} is inside the output folder")
        message = refused(capsys, "shard", synth_chest, synth_chest / "shards", "--key", key)
        assert message == "the output folder is inside the source folder; choose an output folder elsewhere"
        message = refused(capsys, *args, "--key", key, "--modalities", " , ")
        assert message == "no modality to shard; give at least one, e.g. --modalities CR,DX"
        message = refused(capsys, *args, "--key", key, "--age-buckets", "0-17,adult")
        assert message.startswith("age bucket 'adult' must look like 'N+'")
        message = refused(capsys, *args, "--key", key, "--csv", sandbox.root / "labels.csv")
        assert message == f"metadata CSV {sandbox.root / 'labels.csv'} not found; give an existing file with --csv"
    assert not out.exists() and not (sandbox.root / "shards.private").exists()
