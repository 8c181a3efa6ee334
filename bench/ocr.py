"""What burned-in text screening costs per image (detection vs recognition) and how well it finds identifiers.

    python bench/ocr.py                    # speed on 16 synthetic images, cost of 500,000 images on 16 cores
    python bench/ocr.py --quality 400      # + recall / false withholds on 400 synthetic images (half with PHI)
    python bench/ocr.py --n 8 --cores 64   # fewer images, cost on 64 cores
    python bench/ocr.py --n 0 --quality 100 --text-px 8 12   # below the target range

Images come from `radpretrain.synth.burned_in`: synthetic radiographs drawn at 1024 px and shrunk to 512 px as
the sharder shrinks them, with names, dates and IDs (PHI images) or only side/view markers (clean images) in
OpenCV fonts of 12-32 px cap height, varied contrast, polarity, position and rotation. The screen is the one
`radpretrain shard --scan-text` runs (`shards.ocr.find_text`, default `TextRules`), on one thread:
- speed: ms per image for detection (on the 512 px image) and for recognition (inside the boxes found), side
  by side with detection as RapidOCR does it by default (short side brought up to 736 px);
- quality: recall (PHI images withheld) overall and by the smallest PHI string's size and by rotation, and
  the false-withhold rate (clean images withheld). Targets: recall >= 0.98 at >= 12 px, false withholds <= 2 %.
Wall-clock figures on a shared machine are rough; the ratios hold better.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import numpy as np

IMAGES_500K = 500_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16, help="images timed (half with PHI; default 16)")
    parser.add_argument("--quality", type=int, default=0, help="images for recall / false withholds (0: skip)")
    parser.add_argument("--cores", type=int, default=16, help="cores for the 500,000-image estimate (16)")
    parser.add_argument("--size", type=int, default=512, help="image long side the screen sees (512)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (0)")
    parser.add_argument(
        "--text-px", type=float, nargs=2, default=(12, 32), metavar=("LOW", "HIGH"), help="cap heights (12 32)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import cv2

    from radpretrain.shards import ocr
    from radpretrain.synth import burned_in

    cv2.setNumThreads(1)
    rules = ocr.TextRules()
    engine = ocr.engine()
    if args.n:
        speed(burned_in.corpus(args.n, seed=args.seed + 1, size=args.size), rules, engine, args.cores)
    if args.quality:
        started = time.perf_counter()
        images = burned_in.corpus(args.quality, seed=args.seed, size=args.size, text_px=tuple(args.text_px))
        print(f"quality corpus: {len(images)} images generated in {time.perf_counter() - started:.0f} s")
        quality(images, rules)
    return 0


def speed(images: list, rules: object, engine: object, cores: int) -> None:
    """Detection and recognition ms per image; detection at RapidOCR's default scale beside it."""
    from rapidocr_onnxruntime import RapidOCR

    from radpretrain.shards import ocr

    default = RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1)  # short side up to 736 px
    ocr.find_text(images[0].image, rules)  # warm up: the first run allocates the session's buffers
    detect, recognize, boxes, upscaled = [], [], [], []
    for item in images:
        finding = ocr.find_text(item.image, rules)
        detect.append(finding.detect_s * 1000)
        recognize.append(finding.recognize_s * 1000)
        boxes.append(finding.detected)
        started = time.perf_counter()
        default.text_det(ocr.display_image(item.image))
        upscaled.append((time.perf_counter() - started) * 1000)
    total = [d + r for d, r in zip(detect, recognize, strict=True)]
    print(f"speed: {len(images)} images of {max(images[0].image.shape)} px, one thread, ms per image (mean / median)")
    print(f"  detection    {statistics.mean(detect):7.1f} / {statistics.median(detect):7.1f}")
    print(
        f"  recognition  {statistics.mean(recognize):7.1f} / {statistics.median(recognize):7.1f}  "
        f"({statistics.mean(boxes):.1f} boxes per image)"
    )
    print(f"  screen       {statistics.mean(total):7.1f} / {statistics.median(total):7.1f}")
    print(
        f"  detection as RapidOCR does by default (short side -> 736 px): {statistics.mean(upscaled):.1f} ms, "
        f"{statistics.mean(upscaled) / statistics.mean(detect):.2f}x ours"
    )
    hours = statistics.mean(total) / 1000 * IMAGES_500K / cores / 3600
    print(
        f"  500,000 images on {cores} cores: {hours:.1f} h of screening "
        f"({statistics.mean(total) / 1000 * IMAGES_500K / 3600:.0f} core-hours), on top of decoding and writing"
    )


def quality(images: list, rules: object) -> None:
    """Recall on PHI images and the false-withhold rate on clean ones, with breakdowns."""
    from radpretrain.shards import ocr
    from radpretrain.synth.burned_in import MARKERS

    hits: dict[str, list[bool]] = defaultdict(list)
    false_withholds = []
    for item in images:
        withheld = bool(ocr.find_text(item.image, rules).boxes)  # type: ignore[arg-type]
        if not item.phi:
            false_withholds.append(withheld)
            continue
        phi = [(px, angle) for text, px, angle in zip(item.texts, item.text_px, item.angles, strict=True)]
        phi = [(px, angle) for (px, angle), text in zip(phi, item.texts, strict=True) if text not in MARKERS]
        smallest = min(px for px, _ in phi)
        hits["all"].append(withheld)
        hits[f"smallest PHI text {_bucket(smallest)} px"].append(withheld)
        hits["one PHI line" if len(phi) == 1 else "two or three PHI lines"].append(withheld)
        rotated = any(angle for _, angle in phi)
        hits["some PHI text rotated" if rotated else "PHI text horizontal"].append(withheld)
    print(f"quality: {len(hits['all'])} PHI images, {len(false_withholds)} clean images")
    for name in sorted(hits, key=lambda k: (k != "all", k)):
        values = hits[name]
        print(f"  recall {name:32s} {np.mean(values):.3f}  ({sum(values)}/{len(values)})")
    rate = float(np.mean(false_withholds)) if false_withholds else float("nan")
    print(f"  false withholds (clean images)          {rate:.3f}  ({sum(false_withholds)}/{len(false_withholds)})")


def _bucket(px: float) -> str:
    for low, high in ((8, 10), (10, 12), (12, 16), (16, 20), (20, 26), (26, 33)):
        if low <= px < high:
            return f"{low}-{high - 1}"
    return f"{int(px)}"


if __name__ == "__main__":
    raise SystemExit(main())
