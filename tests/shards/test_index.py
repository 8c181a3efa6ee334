"""The header-only index: statuses and reasons, the private path table, options, and bad sources."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from radpretrain.config import to_dict
from radpretrain.errors import ShardError
from radpretrain.shards import deid, index
from radpretrain.shards.index import IndexOptions, build_index, current_index, read_index, read_private_paths
from tests.shards.helpers import make_radiograph

PSEUDO = deid.Pseudonymizer(b"k" * 32)


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    src = tmp_path / "Smith John 1950"
    make_radiograph(src / "ok" / "a.dcm", "P1", seed=1)
    make_radiograph(src / "ok" / "b.dcm", "P2", seed=2, age=None)
    make_radiograph(src / "ct.dcm", "P1", modality="CT")
    make_radiograph(src / "burned.dcm", "P3", burned_in="YES")
    make_radiograph(src / "rgb.dcm", "P3", photometric="RGB")
    (src / "notes.txt").write_text("not a dicom file")
    (src / "empty.dcm").write_bytes(b"")
    cv2.imwrite(str(src / "thumb.png"), np.zeros((8, 8), np.uint8))
    (src / "gone.dcm").symlink_to(tmp_path / "deleted.dcm")
    return src


def _by_path(out: Path, private: Path) -> dict[str, dict]:
    _, paths = read_private_paths(private)
    return {paths[row["file"]]: row for row in read_index(out).rows}  # type: ignore[union-attr]


def test_statuses_reasons_and_private_paths(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_index(archive, out, PSEUDO, progress=False)
    private = tmp_path / "out.private"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    rows = _by_path(out, private)
    assert {p: (r["status"], r["reason"]) for p, r in rows.items()} == {
        "ok/a.dcm": ("ok", None),
        "ok/b.dcm": ("ok", None),
        "ct.dcm": ("skipped", "modality not selected"),
        "burned.dcm": ("skipped", "burned-in annotation"),
        "rgb.dcm": ("skipped", "colour image (photometric RGB)"),
        "notes.txt": ("skipped", "not a DICOM file"),
        "empty.dcm": ("skipped", "empty file"),
        "thumb.png": ("skipped", "not a DICOM file"),  # a thumbnail in a DICOM export is not a radiograph
        "gone.dcm": ("failed", "unreadable file"),  # a broken link is seen and counted
    }
    assert rows["ok/a.dcm"]["sop"] and rows["ok/a.dcm"]["age_years"] == 45 and rows["ok/b.dcm"]["age_years"] is None
    public = (out / "index.jsonl").read_text() + (out / "index.json").read_text()
    for secret in ("Smith", "a.dcm", "P1", "notes.txt"):
        assert secret not in public
    source, _ = read_private_paths(private)
    assert source == archive.resolve()


def test_options_change_what_is_selected(archive: Path, tmp_path: Path) -> None:
    options = IndexOptions(modalities=["CR", "CT"], include_burned_in=True, images="yes")
    build_index(archive, tmp_path / "out", PSEUDO, options, progress=False)
    rows = _by_path(tmp_path / "out", tmp_path / "out.private")
    assert all(rows[p]["status"] == "ok" for p in ("ct.dcm", "burned.dcm", "thumb.png"))
    assert rows["rgb.dcm"]["status"] == "skipped"
    assert rows["thumb.png"]["kind"] == "image"


def test_pool_gives_the_same_rows(archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serial = build_index(archive, tmp_path / "one", PSEUDO, progress=False)
    monkeypatch.setattr(index, "POOL_MIN_FILES", 0)
    pooled = build_index(archive, tmp_path / "two", PSEUDO, workers=2, progress=False)
    assert pooled.rows == serial.rows


def test_bad_sources_and_folders(archive: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="does not exist"):
        build_index(tmp_path / "missing", tmp_path / "out", PSEUDO)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="holds no files"):
        build_index(tmp_path / "empty", tmp_path / "out", PSEUDO)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("hello")
    with pytest.raises(ShardError, match="none is a DICOM file"):
        build_index(tmp_path / "texts", tmp_path / "out", PSEUDO, progress=False)
    with pytest.raises(ShardError, match="inside the source folder"):
        build_index(archive, archive / "out", PSEUDO)
    with pytest.raises(ShardError, match="private folder must not be inside"):
        build_index(archive, tmp_path / "out", PSEUDO, private_dir=tmp_path / "out" / "p", progress=False)
    assert read_index(tmp_path / "nothing") is None
    build_index(archive, tmp_path / "out", PSEUDO, progress=False)
    meta = json.loads((tmp_path / "out" / "index.json").read_text())
    (tmp_path / "out" / "index.json").write_text(json.dumps({**meta, "files": meta["files"] + 1}))
    with pytest.raises(ShardError, match="incomplete"):
        read_index(tmp_path / "out")


def _counting_builds(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every index build current_index starts (by its output folder)."""
    built: list[Path] = []
    real = index.build_index

    def counting(src: Any, out: Any, *args: Any, **kwargs: Any) -> index.Index:
        built.append(Path(out))
        return real(src, out, *args, **kwargs)

    monkeypatch.setattr(index, "build_index", counting)
    return built


def test_current_index_reuses_the_same_settings_and_refuses_others(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = _counting_builds(monkeypatch)
    out = tmp_path / "out"
    first = current_index(archive, out, IndexOptions(), PSEUDO, progress=False)
    assert len(built) == 1
    again = current_index(archive, out, IndexOptions(), PSEUDO, progress=False)
    assert len(built) == 1 and again.rows == first.rows, "the same settings reuse the index"
    current_index(archive, out, IndexOptions(), PSEUDO, progress=False, reuse=False)
    assert len(built) == 2, "without reuse the headers are read again"

    other_options = IndexOptions(modalities=["CR", "CT"])
    copy = tmp_path / "copy"
    shutil.copytree(archive, copy, symlinks=True)
    refusals = [
        ((archive, other_options, PSEUDO), r"other index options \(modalities: \['CR', 'DX', .*\] -> \['CR', 'CT'\]\)"),
        ((archive, IndexOptions(), deid.Pseudonymizer(b"o" * 32)), "another de-identification key"),
        ((copy, IndexOptions(), PSEUDO), "another source folder"),
    ]
    for (src, options, pseudonymize), message in refusals:
        for reuse in (True, False):  # the shard run and the index command refuse alike
            with pytest.raises(ShardError, match=message + ".*--overwrite to replace it"):
                current_index(src, out, options, pseudonymize, progress=False, reuse=reuse)
    assert len(built) == 2, "a refused index is left as it was"
    assert read_index(out).meta["options"] == to_dict(IndexOptions())  # type: ignore[union-attr]

    replaced = current_index(archive, out, other_options, PSEUDO, progress=False, overwrite=True)
    assert len(built) == 3 and replaced.meta["options"] == to_dict(other_options)
    assert read_index(out).meta["options"] == to_dict(other_options)  # type: ignore[union-attr]


def test_current_index_for_a_part_never_builds(archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = _counting_builds(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(ShardError, match="--part needs the index that all parts share"):
        current_index(archive, out, IndexOptions(), PSEUDO, progress=False, part=(0, 2))
    assert not built and read_index(out) is None
    made = current_index(archive, out, IndexOptions(), PSEUDO, progress=False)
    shared = current_index(archive, out, IndexOptions(), PSEUDO, progress=False, part=(1, 2))
    assert len(built) == 1 and shared.rows == made.rows
    with pytest.raises(ShardError, match="--part needs the index"):  # a part never reads the headers again
        current_index(archive, out, IndexOptions(), PSEUDO, progress=False, part=(1, 2), reuse=False)
    with pytest.raises(ShardError, match="other index options"):  # nor replaces the shared index
        current_index(archive, out, IndexOptions(images="yes"), PSEUDO, progress=False, part=(1, 2), overwrite=True)
    assert len(built) == 1


def test_current_index_rebuilds_an_unreadable_index_without_reuse(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    current_index(archive, out, IndexOptions(), PSEUDO, progress=False)
    (out / "index.jsonl").write_text("{broken\n")
    with pytest.raises(ShardError, match=r"unreadable.*--reindex"):
        current_index(archive, out, IndexOptions(), PSEUDO, progress=False)
    rebuilt = current_index(archive, out, IndexOptions(), PSEUDO, progress=False, reuse=False)
    assert read_index(out).rows == rebuilt.rows  # type: ignore[union-attr]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temp file left"


def test_deflated_headers_are_read_without_inflating_the_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from radpretrain import synth

    summary = synth.generate(
        tmp_path / "src", 12, seed=3, syntaxes=["DeflatedExplicitVRLittleEndian"], min_size=200, max_size=300
    )
    paths = summary.paths_of("radiograph")
    assert paths
    inflated: list[int] = []
    monkeypatch.setattr(index, "INFLATE_CHUNK", 256)  # several chunks even for the header of a small image
    fast = []
    for path in paths:
        assert index.read_deflated_header(path) is not None  # the partial read was taken, not the whole one
        fast.append(index.dicom_row(path, path.name, PSEUDO, IndexOptions()))
    monkeypatch.setattr(index, "read_deflated_header", lambda path: inflated.append(1))
    whole = [index.dicom_row(path, path.name, PSEUDO, IndexOptions()) for path in paths]
    assert len(inflated) == len(paths)  # the whole read ran for every file
    assert fast == whole
    assert {row["transfer_syntax"] for row in fast} == {"Deflated Explicit VR Little Endian"}
    # Any other file is left to the whole read.
    make_radiograph(tmp_path / "plain.dcm", "P9")
    assert index.read_deflated_header(tmp_path / "plain.dcm") is None
