"""No planted identifier (names, IDs, free text, UIDs, dates, path parts) reaches any output byte or the terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from radpretrain import synth

MARKER = "QZPHI"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "always"}  # show every warning there is
    return subprocess.run(
        [sys.executable, "-m", "radpretrain", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def _needles(summary: synth.SynthSummary) -> set[str]:
    """Planted strings, UIDs and dates, plus every folder and file name of the archive (they hold IDs)."""
    needles = {s for s in summary.phi_strings if len(s) >= 6}
    needles |= {m for m in summary.phi.get("markers", [])}
    for rel in summary.files:
        for part in Path(rel).parts:
            if len(part) >= 6:
                needles.add(part)
                needles.add(Path(part).stem)
    return {n for n in needles if len(n) >= 6}


@pytest.mark.slow
def test_no_identifier_reaches_outputs_or_terminal(tmp_path: Path) -> None:
    summary = synth.generate(
        tmp_path / "src", 40, seed=11, hostile=0.3, min_size=48, max_size=128, phi_marker=MARKER, progress=False
    )
    assert summary.phi["markers"], "synth planted no markers"
    out = tmp_path / "out"
    result = _run(
        "shard", "src", "out", "--size", "64", "--shard-size", "6", "--workers", "2", "--key", "deid.key", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    inspect = _run("inspect", "out", "--n", "8", cwd=tmp_path)
    assert inspect.returncode == 0, inspect.stderr[-2000:]
    terminal = result.stdout + result.stderr + inspect.stdout + inspect.stderr
    assert "files/s" in terminal and "written" in terminal  # the progress bar and summary were captured

    needles = _needles(summary)
    assert any(n.startswith(MARKER) for n in needles) and any(re.fullmatch(r"\d{8}", n) for n in needles)
    texts: dict[str, str] = {"terminal": terminal}
    for path in sorted(out.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    texts[f"{path.name}:{member.name} (name)"] = member.name + member.uname + member.gname
                    if member.name.endswith(".json"):
                        data = tar.extractfile(member)
                        assert data is not None
                        texts[f"{path.name}:{member.name}"] = data.read().decode()
                    else:
                        assert member.name.endswith(".png")  # compressed pixels: nothing else is stored
        elif path.suffix == ".png":
            continue  # the contact sheet: pixels only
        else:
            texts[path.name] = path.read_text()
    assert {"manifest.json", "errors.jsonl", "index.jsonl", "index.json", "plan.json"} <= set(texts)
    assert any(name.endswith(".stats.json") for name in texts)
    leaks = [(where, n) for where, text in texts.items() for n in needles if n in text]
    assert not leaks, f"identifiers leaked: {leaks[:10]}"

    # The private lookup exists, outside OUT, and does hold the paths (so the check above could fail).
    private = tmp_path / "out.private" / "paths.jsonl"
    rows = [json.loads(line) for line in private.read_text().splitlines()]
    assert {row["path"] for row in rows} >= set(summary.files)
    assert any(n in private.read_text() for n in needles)
