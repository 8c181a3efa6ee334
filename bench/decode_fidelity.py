"""Reduced-resolution decoding against full decode + area resize: how far the stored pixels move, and the time.

    python bench/decode_fidelity.py           # 8 synthetic 2500 x 2000 radiographs per codec + pydicom-data's J2K
    python bench/decode_fidelity.py --quick   # 3 synthetic 1000 x 800 radiographs per codec + pydicom-data's J2K

For every image and stored size, the sharder's pixels (`dicom.read_dicom_for` + `resize_longest`, the default)
are compared with full decode + the same area resize (`--exact-decode`): mean and 99th percentile of the absolute
difference in stored grey levels and in per mille of the window (the robust intensity range of the full-decode
image, `ROBUST_PERCENTILES`, the window a shard sample gets without a header window). JPEG 2000 rows are
measured three ways: the default (deepest level that keeps the size, low band moved onto the area grid), without
that shift, and one level less (with the shift). Sources: synthetic 12-bit JPEG 2000 lossless and 8-bit baseline
JPEG (`synth.generate`, `synth.archive.transcode`), and pydicom-data's JPEG 2000 radiographs RG1 (odd sides: full
decode), RG3 (lossless and lossy) and MR2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

PYDICOM_DATA = ("RG3_J2KR.dcm", "RG3_J2KI.dcm", "RG1_J2KR.dcm", "MR2_J2KR.dcm")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 synthetic 1000 x 800 images per codec")
    parser.add_argument("--files", type=int, help="synthetic images per codec (8; --quick 3)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256], help="stored sizes (512 256)")
    args = parser.parse_args(argv)
    count = args.files or (3 if args.quick else 8)
    shape = (1000, 800) if args.quick else (2500, 2000)
    workdir = Path(tempfile.mkdtemp(prefix="radpretrain-fidelity-"))
    try:
        sources = synthetic(workdir, count, shape) + real()
        rows = [row for label, path in sources for size in args.sizes for row in measure(label, path, size)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(rows, count, shape)
    return 0


def synthetic(workdir: Path, count: int, shape: tuple[int, int]) -> list[tuple[str, Path]]:
    from radpretrain import synth
    from radpretrain.errors import ConfigError
    from radpretrain.synth.archive import SynthSummary, transcode

    print(f"synthesizing {count} + {count} files of {shape[0]}x{shape[1]} ...", flush=True)
    j2k, eight = workdir / "j2k", workdir / "jpeg"
    synth.generate(j2k, count, seed=1, shape=shape, bits_stored=12, syntaxes=["JPEG2000Lossless"], progress=False)
    native = ["ExplicitVRLittleEndian"]
    synth.generate(eight, count, seed=2, shape=shape, bits_stored=8, syntaxes=native, progress=False)
    found = [("synthetic J2K lossless 12-bit", p) for p in sorted(SynthSummary.load(j2k).radiographs)]
    for path in sorted(SynthSummary.load(eight).radiographs):
        try:
            transcode(path, path, "JPEGBaseline8Bit")
        except ConfigError:  # synth stores a few radiographs as signed pixels, which baseline JPEG cannot hold
            continue
        found.append(("synthetic JPEG baseline 8-bit q90", path))
    return found


def real() -> list[tuple[str, Path]]:
    from pydicom.data import get_testdata_file

    found = []
    for name in PYDICOM_DATA:
        path = get_testdata_file(name)
        if path is None:
            print(f"pydicom-data's {name} is not installed; skipped", file=sys.stderr)
            continue
        found.append((f"pydicom-data {name}", Path(str(path))))
    return found


@contextmanager
def variant(backoff: int, shift: bool) -> Iterator[None]:
    """Decode with another J2K level choice or without moving the low band onto the area grid."""
    from radpretrain.shards import dicom

    saved = dicom.J2K_BACKOFF, dicom._on_area_grid
    dicom.J2K_BACKOFF = backoff
    if not shift:
        dicom._on_area_grid = lambda arr, level: arr  # type: ignore[assignment]
    try:
        yield
    finally:
        dicom.J2K_BACKOFF, dicom._on_area_grid = saved


def timed(function: Callable[[], object], repeats: int = 3) -> tuple[object, float]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return result, best * 1000.0


def measure(label: str, path: Path, size: int) -> list[dict[str, object]]:
    from radpretrain.shards import dicom
    from radpretrain.shards.format import ROBUST_PERCENTILES

    full, full_ms = timed(lambda: dicom.read_dicom(path)[1])
    assert isinstance(full, np.ndarray)
    reference = dicom.resize_longest(full[0], size).astype(np.float64)
    low, high = np.percentile(reference, ROBUST_PERCENTILES)
    window = max(float(high - low), 1.0)
    variants = [("default", dicom.J2K_BACKOFF, True)]
    if "J2K" in label:
        variants += [("no shift", dicom.J2K_BACKOFF, False), ("one level less", dicom.J2K_BACKOFF + 1, True)]
    rows = []
    for name, backoff, shift in variants:
        with variant(backoff, shift):
            decoded, reduced_ms = timed(lambda: dicom.read_dicom_for(path, size))
        assert isinstance(decoded, dicom.Decoded)
        stored = dicom.resize_longest(decoded.frames[0], size, shape=decoded.shape).astype(np.float64)
        difference = np.abs(stored - reference)
        rows.append(
            {
                "source": label,
                "image": path.name if "pydicom" not in label else "",
                "size": size,
                "variant": name,
                "path": decoded.path,
                "mean": float(difference.mean()),
                "p99": float(np.percentile(difference, 99)),
                "mean_pm": float(difference.mean()) * 1000.0 / window,
                "p99_pm": float(np.percentile(difference, 99)) * 1000.0 / window,
                "full_ms": full_ms,
                "reduced_ms": reduced_ms,
            }
        )
    return rows


def report(rows: list[dict[str, object]], count: int, shape: tuple[int, int]) -> None:
    """One line per source, size and variant: synthetic images are averaged (mean of means, max of p99)."""
    groups: dict[tuple[object, ...], list[dict[str, object]]] = {}
    for row in rows:
        groups.setdefault((row["source"], row["size"], row["variant"], row["path"]), []).append(row)
    lines = [
        "",
        f"Reduced decode vs full decode + area resize ({count} synthetic {shape[0]}x{shape[1]} images per synthetic "
        "row: mean of the per-image means, largest per-image 99th percentile; decode ms: best of 3)",
        "",
        "| source | size | variant | decode path | mean (grey levels) | p99 (grey levels) | mean (per mille) "
        "| p99 (per mille) | decode ms full / reduced |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (source, size, name, path), members in groups.items():
        keys = ("mean", "p99", "mean_pm", "p99_pm", "full_ms", "reduced_ms")
        values = {key: [float(m[key]) for m in members] for key in keys}  # type: ignore[arg-type]
        mean = {key: float(np.mean(v)) for key, v in values.items()}
        most = {key: float(np.max(v)) for key, v in values.items()}
        lines.append(
            f"| {source} ({len(members)}) | {size} | {name} | {path} | {mean['mean']:.2f} | {most['p99']:.1f} "
            f"| {mean['mean_pm']:.2f} | {most['p99_pm']:.1f} | {mean['full_ms']:.0f} / {mean['reduced_ms']:.0f} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
