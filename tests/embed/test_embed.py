"""`radpretrain embed` on a synthetic archive with planted near-duplicates, and the blocked neighbour search."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from radpretrain.cli import main
from radpretrain.embed.extract import COLUMNS, LABEL_FIELDS
from radpretrain.embed.neighbours import search, unit_rows
from radpretrain.shards.format import ShardSet
from tests.embed.conftest import Planted


def test_embed_lists_planted_duplicates_and_every_sample_once(
    planted: Planted, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "embed"
    argv = ["embed", str(planted.encoder), str(planted.shards), str(out), "--cpu", "--workers", "2"]
    assert main([*argv, "--threshold", "0.999", "--batch-size", "8", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("embedded ") and "3 near-duplicate pairs (1 across patients" in line and str(out) in line

    # one row per sample of every split, each key once, and no field outside the allow-list
    table = pq.read_table(out / "embeddings.parquet")
    shards = ShardSet.open(planted.shards)
    assert table.num_rows == sum(shards.samples(s) for s in shards.manifest["splits"])
    keys = table.column("key").to_pylist()
    assert len(set(keys)) == len(keys)
    assert table.column_names == list(COLUMNS)
    assert set(table.column("split").to_pylist()) <= set(shards.manifest["splits"])
    assert table.schema.field("embedding").type.list_size == 96
    assert table.schema.field("embedding").type.value_type == "float"
    assert {"body_part", "manufacturer", "view", "patient"} <= set(LABEL_FIELDS)
    assert not {"window_center", "age_years", "spacing_mm", "original_shape"} & set(table.column_names)

    # exactly the planted pairs, marked within / across patients
    with (out / "near_duplicates.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    found = {frozenset((row["key_a"], row["key_b"])): row["patients"] for row in rows}
    assert found == {frozenset((a, b)): kind for a, b, kind in planted.pairs}
    assert all(float(row["cosine"]) >= 0.999 for row in rows)

    # k rows per sample, ranked, and each copy's nearest neighbour is its original
    neighbours = pq.read_table(out / "neighbours.parquet").to_pylist()
    assert len(neighbours) == 5 * table.num_rows
    per_key: dict[str, list[dict]] = {}
    for row in neighbours:
        per_key.setdefault(row["key"], []).append(row)
    assert set(per_key) == set(keys)
    for rows_of_key in per_key.values():
        assert [r["rank"] for r in rows_of_key] == [1, 2, 3, 4, 5]
        assert all(r["neighbour"] != r["key"] for r in rows_of_key)
        cosines = [r["cosine"] for r in rows_of_key]
        assert cosines == sorted(cosines, reverse=True)
    for original, copy, _ in planted.pairs:
        assert per_key[copy][0]["neighbour"] == original

    for name in ("body_part", "view", "manufacturer"):
        assert (out / f"map_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["samples"] == table.num_rows and summary["pairs"] == 3
    assert not list(out.glob(".*"))  # no temp or part file left behind


def test_embed_refuses_bad_options_in_one_line(
    planted: Planted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["embed", str(planted.encoder), str(planted.shards), str(tmp_path / "o"), "--cpu", "--workers", "0"]
    assert main([*base, "--colour", "patient"]) == 2
    assert "cannot colour a map by patient" in capsys.readouterr().err
    assert main([*base, "--splits", "tain"]) == 2
    assert "split tain not in" in capsys.readouterr().err
    assert main([*base, "--threshold", "1.5"]) == 2
    assert "within [-1, 1]" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
    assert main([*base, "--map", "umap", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "umap-learn" in err and len(err.strip().splitlines()) == 1
    assert main(["embed", str(tmp_path), str(planted.shards), str(tmp_path / "o")]) == 2
    assert "encoder.json" in capsys.readouterr().err


def brute_force(unit: np.ndarray, k: int, threshold: float) -> tuple[np.ndarray, set[tuple[int, int]]]:
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    i, j = np.nonzero(np.triu(sims >= threshold, 1))
    return top, set(zip(i.tolist(), j.tolist(), strict=True))


@pytest.mark.parametrize("block_bytes", [4 * 37 * 5, 4 * 37 * 37, 1 << 20])
def test_blocked_search_equals_brute_force(block_bytes: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((30, 16)).astype(np.float32)
    near = base[:7] + 0.01 * rng.standard_normal((7, 16)).astype(np.float32)  # 7 planted near-copies
    unit = unit_rows(np.concatenate([base, near]), center=False)
    found = search(unit, k=4, threshold=0.99, block_bytes=block_bytes)
    top, pairs = brute_force(unit, 4, 0.99)
    np.testing.assert_array_equal(found.index, top)
    assert {tuple(p) for p in found.pairs.tolist()} == pairs
    assert {(i, 30 + i) for i in range(7)} <= pairs
    assert list(found.pair_cosine) == sorted(found.pair_cosine, reverse=True) and not found.pairs_capped


def test_search_caps_pairs_and_handles_tiny_inputs() -> None:
    unit = unit_rows(np.ones((6, 3), np.float32) + np.arange(6)[:, None] * 1e-4, center=False)
    found = search(unit, k=2, threshold=0.9, max_pairs=4)
    assert found.pairs_capped and len(found.pairs) == 4
    one = search(unit_rows(np.ones((1, 3), np.float32)), k=5)
    assert one.index.shape == (1, 0) and len(one.pairs) == 0


def test_centering_spreads_cosines_of_positive_features() -> None:
    rng = np.random.default_rng(1)
    features = np.abs(rng.standard_normal((200, 32))).astype(np.float32) + 1.0  # pooled ReLU outputs: all > 0
    raw, centred = unit_rows(features, center=False), unit_rows(features, center=True)
    assert np.median(raw @ raw.T) > 0.9 and abs(np.median(centred @ centred.T)) < 0.2


@pytest.mark.slow
def test_two_processes_embed_each_sample_once_and_match_one(planted: Planted, tmp_path: Path) -> None:
    import os
    import socket
    import subprocess

    with socket.socket() as sock:  # other test runs on this machine may hold accelerate's default port
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate),
        "launch",
        "--multi_gpu",  # with Accelerator(cpu=True): two gloo processes on a CPU machine
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={port}",
        "-m",
        "radpretrain",
        "embed",
        str(planted.encoder),
        str(planted.shards),
        str(tmp_path / "two"),
        "--cpu",
        "--workers=0",
        "--threshold=0.999",
        "--map=none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("embedded ") == 1  # the main process reports once
    assert main(["embed", str(planted.encoder), str(planted.shards), str(tmp_path / "one"), "--cpu"]) == 0

    two, one = (pq.read_table(tmp_path / name / "embeddings.parquet") for name in ("two", "one"))
    assert two.column("key").to_pylist() == one.column("key").to_pylist()  # every sample once, same order
    np.testing.assert_allclose(
        np.stack(two.column("embedding").to_numpy(zero_copy_only=False)),
        np.stack(one.column("embedding").to_numpy(zero_copy_only=False)),
        rtol=1e-4,
        atol=1e-5,
    )
    with (tmp_path / "two" / "near_duplicates.csv").open() as handle:
        found = {frozenset((row["key_a"], row["key_b"])) for row in csv.DictReader(handle)}
    assert found == {frozenset((a, b)) for a, b, _ in planted.pairs}
    assert not list((tmp_path / "two").glob(".*"))  # the part files are gone
