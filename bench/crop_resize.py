"""What bilinear crop resizing costs in fidelity and saves in time against area averaging, side by side.

    python bench/crop_resize.py            # 8 synthetic radiographs + pydicom-data's RG1 and RG3
    python bench/crop_resize.py --quick    # 3 synthetic radiographs + RG1 and RG3

The views (`radpretrain.data.transforms.RadiographCrop`) resize a crop to 224 px bilinearly when it shrinks
by at most `LINEAR_MAX_SHRINK` and by area averaging (INTER_AREA) beyond. This script measures both
interpolations on square crops at a range of shrink factors, taken at random from radiographs stored at
768 px as the sharder stores them (`shards.dicom.resize_longest`), in float32 as the views resize them:
- fidelity: mean absolute difference to a Lanczos resize of the same crop (Pillow, float), in per mille
  of the image's robust window (0.5-99.5 percentiles), for each interpolation;
- time: ms per resize, one thread, for each interpolation on the same crops.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

SHRINKS = (1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
STORED = 768
VIEW = 224
CROPS = 6  # random crops per image and shrink factor
REAL = ("RG1_UNCR.dcm", "RG3_UNCR.dcm")  # pydicom-data: computed radiographs (real patients, public)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", type=int, default=8, help="synthetic radiographs (8)")
    parser.add_argument("--quick", action="store_true", help="3 synthetic radiographs")
    args = parser.parse_args(argv)
    if args.quick:
        args.synthetic = 3
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import cv2

    cv2.setNumThreads(1)
    images = synthetic(args.synthetic) | real()
    fidelity: dict[tuple[float, str], list[float]] = defaultdict(list)
    times: dict[tuple[float, str], list[float]] = defaultdict(list)
    rng = np.random.default_rng(0)
    for image in images.values():
        low, high = np.percentile(image, (0.5, 99.5))
        width = max(float(high - low), 1.0)
        for shrink in SHRINKS:
            side = round(VIEW * shrink)
            if side > min(image.shape):
                continue
            for _ in range(CROPS):
                y, x = (int(rng.integers(0, n - side + 1)) for n in image.shape)
                crop = np.ascontiguousarray(image[y : y + side, x : x + side])
                reference = lanczos(crop)
                for name, flag in (("linear", cv2.INTER_LINEAR), ("area", cv2.INTER_AREA)):
                    start = time.perf_counter()
                    out = cv2.resize(crop, (VIEW, VIEW), interpolation=flag)
                    times[shrink, name].append(time.perf_counter() - start)
                    fidelity[shrink, name].append(float(np.abs(out - reference).mean()) / width * 1000)
    report(fidelity, times, sorted(images))
    return 0


def synthetic(count: int) -> dict[str, np.ndarray]:
    from radpretrain.shards.dicom import read_dicom
    from radpretrain.synth.archive import SynthSummary, generate

    root = Path(tempfile.mkdtemp(prefix="radpretrain-bench-crop-"))
    try:
        generate(root / "export", count, seed=0, shape=(2500, 2000), bits_stored=12, progress=False)
        paths = sorted(SynthSummary.load(root / "export").radiographs)
        return {f"synthetic {i}": stored(read_dicom(path)[1][0]) for i, path in enumerate(paths)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def real() -> dict[str, np.ndarray]:
    import pydicom
    from pydicom.data import get_testdata_file

    images = {}
    for name in REAL:
        path = get_testdata_file(name)
        if path is None:  # pydicom-data is a dev dependency; without it only the synthetic images count
            print(f"{name} not found (pip install pydicom-data); skipped")
            continue
        images[name] = stored(pydicom.dcmread(path).pixel_array)
    return images


def stored(pixels: np.ndarray) -> np.ndarray:
    """What a shard holds at STORED px, as float32 (the views' working type)."""
    from radpretrain.shards.dicom import resize_longest

    return resize_longest(np.asarray(pixels, dtype=np.uint16), STORED).astype(np.float32)


def lanczos(crop: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(crop, mode="F").resize((VIEW, VIEW), Image.Resampling.LANCZOS))


def report(
    fidelity: dict[tuple[float, str], list[float]], times: dict[tuple[float, str], list[float]], names: list[str]
) -> None:
    print()
    print(f"Square crops resized to {VIEW} px from radiographs stored at {STORED} px ({', '.join(names)}), one thread;")
    print("difference to a Lanczos resize in per mille of the window (mean over crops), ms per resize (median):")
    print()
    print("| shrink | crops | linear vs Lanczos | area vs Lanczos | linear ms | area ms | area / linear time |")
    print("|---|---|---|---|---|---|---|")
    for shrink in SHRINKS:
        if (shrink, "linear") not in fidelity:
            continue
        linear, area = (float(np.median(times[shrink, name])) * 1000 for name in ("linear", "area"))
        print(
            f"| {shrink:.2f}x | {len(fidelity[shrink, 'linear'])} | {np.mean(fidelity[shrink, 'linear']):.2f} | "
            f"{np.mean(fidelity[shrink, 'area']):.2f} | {linear:.3f} | {area:.3f} | {area / linear:.1f}x |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
