"""Burned-in text screening: names and dates withhold an image, markers do not, and the text never leaves."""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from radpretrain.errors import ConfigError
from radpretrain.shards import ocr, plain
from radpretrain.shards.dicom import resize_longest
from radpretrain.shards.index import private_dir_for
from radpretrain.shards.inspect import composition_report, inspect_shards
from radpretrain.shards.plan import ShardConfig
from radpretrain.shards.run import shard
from radpretrain.shards.sample import stored_pixels
from radpretrain.synth import burned_in
from radpretrain.synth.phantoms import make_radiograph

pytest.importorskip("rapidocr_onnxruntime")

NAME, DATE, MRN = "DOE^JOHN", "1931-04-17", "MRN 771234"
#: What must never reach OUT, a log line or the terminal (pieces too: OCR may split or join words).
NEEDLES = ("DOE", "JOHN", "1931", "04-17", "771234")


def _write_png(path: Path, texts: list[tuple[str, float]], seed: int) -> None:
    """A 1024 px chest radiograph with `texts` (text, cap height at 1024 px) burned in at full contrast."""
    import cv2

    rng = np.random.default_rng(seed)
    raw, _ = make_radiograph("chest", 50.0, "M", 1024, rng)
    image = raw.astype(np.float32) / 4095.0
    taken: list[tuple[int, int, int, int]] = []
    for text, cap in texts:
        box = burned_in.burn_text(image, text, cap, rng, taken=taken, contrast=0.8, font="SIMPLEX")
        assert box is not None
        taken.append(box)
    cv2.imwrite(str(path), np.clip(image * 65535, 0, 65535).astype(np.uint16))


@pytest.fixture(scope="module")
def screened(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run over three PNGs (name + date, MRN, clean with L and PA), text 13-20 px after shrinking to 512."""
    root = tmp_path_factory.mktemp("ocr")
    src = root / "src"
    src.mkdir()
    _write_png(src / "phi_name.png", [(f"{NAME} {DATE}", 30.0), ("R", 40.0)], seed=1)
    _write_png(src / "phi_mrn.png", [(MRN, 26.0)], seed=2)
    _write_png(src / "clean.png", [("L", 44.0), ("PA", 32.0)], seed=3)
    out = root / "out"
    config = ShardConfig(size=512, shard_size=10, val_fraction=0.0, test_fraction=0.0, scan_text="unflagged")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    terminal = io.StringIO()
    try:
        with contextlib.redirect_stderr(terminal), contextlib.redirect_stdout(terminal):
            summary = shard(src, out, config, key=root / "deid.key", progress=True)
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    logs = [r.getMessage() for r in records]
    return {"root": root, "out": out, "summary": summary, "logs": logs, "terminal": terminal.getvalue()}


def test_text_beyond_markers_is_withheld_and_accounted(screened: dict[str, Any]) -> None:
    counts = screened["summary"].manifest["counts"]
    assert counts["files_seen"] == 3
    assert counts["written"] == 1  # the clean image with "L" and "PA"
    assert counts["skipped"] == {ocr.REASON: 2}
    assert (
        counts["written"] + counts["duplicate"] + sum(counts["skipped"].values()) + sum(counts["failed"].values())
        == counts["files_seen"]
    )
    errors = [json.loads(line) for line in (screened["out"] / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["reason"] for e in errors) == [ocr.REASON, ocr.REASON]
    assert "burned-in text: 2 withheld (--scan-text=unflagged)" in composition_report(screened["out"])


def test_private_folder_records_boxes_not_text(screened: dict[str, Any]) -> None:
    private = private_dir_for(screened["out"])
    errors = [json.loads(line) for line in (screened["out"] / "errors.jsonl").read_text().splitlines()]
    for error in errors:
        record = ocr.read_withheld(private, error["file"])
        assert record is not None and max(record["shape"]) == 512 and record["boxes"]
        rows, cols = record["shape"]
        for x0, y0, x1, y1 in record["boxes"]:
            assert 0 <= x0 < x1 <= cols and 0 <= y0 < y1 <= rows
        text = (private / ocr.WITHHELD_DIR / f"{error['file']}.json").read_text()
        assert not [n for n in NEEDLES if n in text]


def _read(path: Path) -> list[str]:
    """What OCR reads in a source PNG shrunk to 512 px, as the run saw it (test-only: the library never
    returns the text)."""
    grey = plain.read_grey(path)
    image = ocr.display_image(stored_pixels(resize_longest(grey, 512))[0])
    engine = ocr.engine()
    boxes, _ = engine.text_det(image)
    read, _ = engine.text_rec(engine.get_crop_img_list(image, list(boxes)))
    return [str(text) for text, *_ in read]


def test_recognised_text_reaches_no_output_byte_or_log(screened: dict[str, Any]) -> None:
    # The planted strings, and what OCR made of them (it reads "DOE" as "D0E" at times).
    read = _read(screened["root"] / "src" / "phi_name.png") + _read(screened["root"] / "src" / "phi_mrn.png")
    assert any("1931" in text for text in read) and any("771234" in text for text in read), read
    needles = set(NEEDLES) | {token for text in read for token in text.split() if len(token) >= 4}
    assert "3/3" in screened["terminal"]  # the progress bar was captured
    texts: dict[str, bytes] = {"logs": "\n".join(screened["logs"]).encode(), "terminal": screened["terminal"].encode()}
    for path in sorted(screened["out"].rglob("*")):
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    data = tar.extractfile(member)
                    assert data is not None
                    texts[f"{path.name}:{member.name}"] = member.name.encode() + data.read()
        elif path.is_file():
            texts[path.name] = path.read_bytes()
    assert "errors.jsonl" in texts and "manifest.json" in texts and any(n.endswith(".png") for n in texts)
    leaks = [(where, n) for where, data in texts.items() for n in needles if n.encode() in data]
    assert not leaks, f"recognised text leaked: {leaks}"


def test_withheld_sheet_goes_to_the_private_folder_only(screened: dict[str, Any]) -> None:
    out = screened["out"]
    shown: list[str] = []
    path = inspect_shards(out, withheld=True, show=shown.append)
    assert path == private_dir_for(out) / "withheld_sheet.png" and path.stat().st_size > 1000
    assert "2 withheld" in shown[0]
    import cv2

    sheet = cv2.imread(str(path))
    red = (sheet[..., 2] > 200) & (sheet[..., 1] < 60) & (sheet[..., 0] < 60)
    assert red.sum() > 50  # the boxes are drawn
    with pytest.raises(Exception, match="must not be written inside the shard folder"):
        inspect_shards(out, out / "sheet.png", withheld=True, show=shown.append)


def test_rules_pass_markers_arrows_and_short_tokens() -> None:
    rules = ShardConfig().text_rules
    passing = ("L", "R", "PA", "AP ERECT", "LAT", "PORTABLE", "SUPINE", "PAERECT", "->", "Rt.", "ab", "←", "", "00 O")
    passing += ("1", "0.0", "PORTAB", "RECT", "CPORTABLE")
    for text in passing:
        assert rules.allows(text), text
    withheld = ("DOE^JOHN", "JONAS JENSEN", "1931-04-17", "MRN 771234", "L2", "DOE", "14 MAR 2018", "ID:0045", "0000")
    withheld += ("ERECTS2", "PORTABLEXY", "TABLE1", "TAN", "RON")
    for text in withheld:
        assert not rules.allows(text), text
    custom = ocr.TextRules(markers=["l", "R", "STANDING"])
    custom.validate()
    assert custom.allows("PA l") and custom.allows("STANDING")  # PA: a short token; markers are upper-cased
    assert not custom.allows("ERECT") and not custom.allows("PORTABLE")  # no longer markers
    assert custom.allows("STAND") and not ocr.TextRules(markers=["STANDING"], fragments=False).allows("STAND")


def test_unflagged_scans_only_images_whose_header_does_not_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    scanned: list[str] = []

    def fake_find(stored: np.ndarray, rules: ocr.TextRules) -> ocr.Finding:
        scanned.append("x")
        return ocr.Finding([], 0, 0.0, 0.0)

    monkeypatch.setattr(ocr, "find_text", fake_find)
    image = np.zeros((8, 8), np.uint16)
    unflagged = ocr.TextScreen("unflagged", ocr.TextRules(), "/nonexistent")
    for flag in ("YES", "NO", " no "):
        unflagged.screen(image, "ab", 0, flag)
    assert scanned == []
    for flag in (None, "", "UNKNOWN"):
        unflagged.screen(image, "ab", 0, flag)
    assert len(scanned) == 3
    ocr.TextScreen("all", ocr.TextRules(), "/nonexistent").screen(image, "ab", 0, "NO")
    assert len(scanned) == 4


def test_missing_extra_fails_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_import = builtins.__import__

    def no_ocr(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("rapidocr_onnxruntime"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ocr)
    (tmp_path / "src").mkdir()
    with pytest.raises(ConfigError) as info:
        shard(tmp_path / "src", tmp_path / "out", ShardConfig(scan_text="all"), key=tmp_path / "k")
    assert "pip install 'radpretrain[ocr]'" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out" / "index.jsonl").exists()  # it failed before reading anything


def test_the_dicom_header_flag_reaches_the_screen(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Synthetic radiographs say BurnedInAnnotation=NO: `unflagged` reads none of them, `all` reads each."""
    from radpretrain import synth

    summary = synth.generate(tmp_path / "src", 3, seed=4, min_size=64, max_size=96, progress=False)
    scanned: list[tuple[int, ...]] = []

    def fake_find(stored: np.ndarray, rules: ocr.TextRules) -> ocr.Finding:
        scanned.append(stored.shape)
        return ocr.Finding([], 0, 0.0, 0.0)

    monkeypatch.setattr(ocr, "find_text", fake_find)
    for mode, expected in (("unflagged", 0), ("all", summary.n_files)):
        scanned.clear()
        config = ShardConfig(size=64, val_fraction=0.0, test_fraction=0.0, scan_text=mode)  # type: ignore[arg-type]
        result = shard(tmp_path / "src", tmp_path / mode, config, key=tmp_path / "k", progress=False)
        assert result.manifest is not None and result.manifest["counts"]["written"] == summary.n_files
        assert len(scanned) == expected and all(max(shape) <= 64 for shape in scanned)
