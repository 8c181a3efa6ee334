"""Loader speed: two-view 224 px samples per core from shards vs opening each DICOM file per sample, side by side.

    python bench/loader.py            # 100 radiographs of 2500 x 2000 (12-bit) + 24 compressed ones
    python bench/loader.py --quick    # 30 + 8
    python bench/loader.py --quick --split-only    # only whole shards vs split samples

What is compared, on the same synthetic radiographs (`radpretrain.synth.archive.generate`), each producing
batches of 32 samples with two strong 224 px views (`radpretrain.data.transforms`, the loop's policy) and
the header labels through a DataLoader in this one process (one thread: torch, cv2 and BLAS limited to 1):
- shards: `radpretrain.shards.reader.build_pipeline` over the archive sharded at 512 px (what the
  pretraining loop reads), once with each pixel codec (`--codec png`, the default, and `--codec blosc2`);
- per-file DICOM: a map-style Dataset whose `__getitem__` opens the file with pydicom, decodes it,
  applies the modality LUT (and MONOCHROME1 inversion) and makes the same two views from the full-size
  image (what a training script does without shards), once on uncompressed files and once on the
  compressed syntaxes archives often hold (RLE, JPEG-LS, JPEG 2000 lossless, deflate);
- whole shards vs split samples (issue 16): the same shards read by 1 reader taking every shard whole, and by
  --split-readers readers per shard each taking one in that many samples of one shard (what readers do when the
  shards are fewer than processes x loader workers: the others' members are passed by, headers only). The
  readers run one after another in this process, so "per core" is the total samples/s per reader-core; once
  with the two views (the loop's work per sample) and once decoding only (reading weighs most there).
"Per core" is samples per CPU-second of this process. Every file is read once before timing (page cache).
Each contender runs REPEATS times, alternating, and its fastest run counts (all runs are printed): single
runs on a shared machine differ by 10 %.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagecache import prime  # bench/ sibling module (the script folder is on sys.path)

CODECS = ("png", "blosc2")
REPEATS = 2
TARGET_PER_CORE = 150.0  # two-view samples per CPU-second from shards
TARGET_RATIO = 20.0  # shards per core / per-file uncompressed DICOM per core
TARGET_SPLIT_COST = 0.05  # split samples: at most 5 % more CPU per sample than whole shards
COMPRESSED = ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless", "DeflatedExplicitVRLittleEndian"]
BATCH = 32
VIEW_SIZE = 224
WORKS = ("two views", "decode only")


@dataclass
class Run:
    samples: int
    wall: float
    cpu: float

    @property
    def per_core(self) -> float:
        return self.samples / self.cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100, help="uncompressed radiographs (100)")
    parser.add_argument("--compressed", type=int, default=24, help="compressed radiographs (24; 0 skips them)")
    parser.add_argument("--shard-samples", type=int, default=1000, help="samples read from shards (1000)")
    parser.add_argument("--quick", action="store_true", help="30 + 8 files, 300 shard samples")
    parser.add_argument("--workdir", help="where archives and shards go (default: a temp dir, removed after)")
    parser.add_argument("--split-readers", type=int, default=4, help="readers per shard when samples are split (4)")
    parser.add_argument("--split-only", action="store_true", help="only whole shards vs split samples")
    args = parser.parse_args(argv)
    if args.quick:
        args.files, args.compressed, args.shard_samples = 30, 8, 300
    if args.split_readers < 2:
        parser.error(f"--split-readers must be at least 2, got {args.split_readers}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="radpretrain-bench-loader-"))
    try:
        plain = synthesize(workdir / "plain", args.files, ["ExplicitVRLittleEndian"], seed=0)
        shards = {codec: make_shards(plain, workdir, codec) for codec in CODECS}
        contenders: dict[str, Callable[[], Run]] = {}
        if not args.split_only:
            packed = None
            if args.compressed:
                packed = synthesize(workdir / "compressed", args.compressed, COMPRESSED, seed=1)
            for codec in CODECS:
                contenders[f"shards:{codec}"] = lambda c=codec: time_shards(shards[c], args.shard_samples)
            contenders["dicom"] = lambda: time_dicom(radiographs(plain), shards["png"])
            if packed is not None:
                contenders["dicom_compressed"] = lambda: time_dicom(radiographs(packed), shards["png"])
        for codec, work, per_shard in itertools.product(CODECS, WORKS, (1, args.split_readers)):
            contenders[f"{'whole' if per_shard == 1 else 'split'}:{codec}:{work}"] = (
                lambda c=codec, w=work, k=per_shard: time_readers(shards[c], k, w, args.shard_samples)
            )
        runs: dict[str, list[Run]] = {name: [] for name in contenders}
        for _ in range(REPEATS):
            for name, run in contenders.items():
                runs[name].append(run())
        if not args.split_only:
            report(runs, {codec: sample_bytes(path) for codec, path in shards.items()})
        report_split(runs, args.split_readers)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def synthesize(root: Path, count: int, syntaxes: list[str], seed: int) -> Path:
    from radpretrain import synth

    root.parent.mkdir(parents=True, exist_ok=True)
    need = count * 2500 * 2000 * 2 + 2**30
    if not (root / synth.SYNTH_JSON).exists() and shutil.disk_usage(root.parent).free < need:
        sys.exit(f"bench/loader.py: {count} files need about {need / 2**30:.1f} GB free in {root.parent}")
    print(f"synthesizing {count} radiographs of 2500x2000 ({', '.join(syntaxes)}) ...", flush=True)
    workers = len(os.sched_getaffinity(0))
    synth.generate(
        root, count, seed=seed, shape=(2500, 2000), bits_stored=12, syntaxes=syntaxes, workers=workers, progress=True
    )
    return root


def radiographs(root: Path) -> list[Path]:
    from radpretrain.synth.archive import SynthSummary

    return sorted(SynthSummary.load(root).radiographs)


def make_shards(archive: Path, workdir: Path, codec: str) -> Path:
    from radpretrain.shards.plan import ShardConfig
    from radpretrain.shards.run import shard

    print(f"sharding at 512 px with codec {codec} ...", flush=True)
    # 100 files a shard: the smallest shard `--shard-size auto` makes, so split readers start as often as they would.
    config = ShardConfig(size=512, shard_size=100, val_fraction=0.0, test_fraction=0.0, codec=codec)
    out = workdir / f"shards-{codec}"
    shard(archive, out, config, key=workdir / "deid.key", workers=len(os.sched_getaffinity(0)))
    return out


def sample_bytes(shards: Path) -> float:
    """Mean tar bytes per sample (pixels, json and tar headers)."""
    from radpretrain.shards.format import ShardSet

    samples = ShardSet.open(shards).manifest["counts"]["samples"]
    return sum(Path(url).stat().st_size for url in ShardSet.open(shards).urls("train")) / samples


def sample_fn(shards: Path) -> Any:
    from radpretrain.data.transforms import ViewsConfig, build_sample_fn
    from radpretrain.shards.format import ShardSet

    return build_sample_fn(("view0", "view1"), ViewsConfig(), ShardSet.open(shards).manifest["vocab"], VIEW_SIZE)


def time_shards(shards: Path, samples: int) -> Run:
    from torch.utils.data import DataLoader

    from radpretrain.shards.format import ShardSet
    from radpretrain.shards.reader import build_pipeline

    urls = ShardSet.open(shards).urls("train")
    prime(urls)
    pipeline = build_pipeline(urls, shuffle=200, seed=0, map_fn=sample_fn(shards))
    loader = DataLoader(pipeline, batch_size=BATCH, num_workers=0)
    next(iter(loader))  # warm-up: imports and first allocations are not the loader's speed

    def batches() -> Iterable[Any]:
        while True:
            yield from loader  # epochs until enough samples

    return timed(batches(), samples, "shards")


def time_readers(shards: Path, per_shard: int, work: str, samples: int) -> Run:
    """All train samples, passes until `samples`: one reader taking every shard whole (per_shard 1), or
    per_shard readers per shard, one after another, each taking one in per_shard samples of its shard."""
    from radpretrain.shards.format import ShardSet
    from radpretrain.shards.reader import build_pipeline

    urls = ShardSet.open(shards).urls("train")
    prime(urls)
    views = sample_fn(shards) if work == "two views" else None
    readers = 1 if per_shard == 1 else len(urls) * per_shard  # more readers than shards: each takes one part
    saved = {name: os.environ.get(name) for name in ("RANK", "WORLD_SIZE")}
    print(f"timing {work} from shards, {readers} reader(s) ({samples} samples) ...", flush=True)
    done, wall, cpu = 0, time.perf_counter(), time.process_time()
    try:
        while done < samples:
            for rank in range(readers):  # the reader layout comes from RANK / WORLD_SIZE, as under torchrun
                os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(readers)
                done += sum(1 for _ in build_pipeline(urls, shuffle=0, map_fn=views or _decoded))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return Run(done, time.perf_counter() - wall, time.process_time() - cpu)


def _decoded(sample: dict[str, Any]) -> dict[str, Any]:
    return sample


class DicomFiles:
    """A map-style Dataset: each sample opens its DICOM file with pydicom and makes the views from full size."""

    def __init__(self, paths: list[Path], make_sample: Any) -> None:
        self.paths = paths
        self.make_sample = make_sample

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np
        import pydicom
        from pydicom.pixels import apply_modality_lut

        from radpretrain.shards.dicom import window_from_header

        ds = pydicom.dcmread(self.paths[index])
        pixels = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            pixels = pixels.max() - pixels
        window = window_from_header(ds)
        center, width = window if window else ((pixels.min() + pixels.max()) / 2, np.ptp(pixels))
        meta = {"window_center": center, "window_width": width, "body_part": None, "age_bucket": None}
        return self.make_sample({"key": str(index), "pixels": pixels, "meta": meta})


def time_dicom(paths: list[Path], shards: Path) -> Run:
    import torch
    from torch.utils.data import DataLoader

    prime(paths)
    loader = DataLoader(
        DicomFiles(paths, sample_fn(shards)),
        batch_size=BATCH,
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(0),
    )
    return timed(iter(loader), len(paths), "per-file DICOM")


def timed(batches: Iterable[Any], samples: int, name: str) -> Run:
    print(f"timing {name} ({samples} samples) ...", flush=True)
    done = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        done += len(batch["view0"])
        if done >= samples:
            break
    return Run(done, time.perf_counter() - wall, time.process_time() - cpu)


def fastest(runs: list[Run]) -> Run:
    return max(runs, key=lambda run: run.per_core)


def report(runs: dict[str, list[Run]], sizes: dict[str, float]) -> None:
    print()
    print(
        f"Two-view {VIEW_SIZE} px samples (batches of {BATCH}, one thread, load average {os.getloadavg()[0]:.1f}, "
        f"fastest of {REPEATS} runs); 2500x2000 12-bit radiographs, shards at 512 px:"
    )
    for name, each in runs.items():
        print(f"  {name}: " + ", ".join(f"{run.per_core:.1f}" for run in each) + " samples/s per core")
    dicom = fastest(runs["dicom"])
    packed = fastest(runs["dicom_compressed"]) if "dicom_compressed" in runs else None
    print()
    print(
        "| loader | samples | ms per sample (CPU) | samples/s per core | samples/s (wall) | KB per sample | "
        f"vs per-file DICOM, uncompressed (>= {TARGET_RATIO:.0f}x) | vs per-file DICOM, compressed | "
        f">= {TARGET_PER_CORE:.0f}/s per core |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for codec in CODECS:
        run = fastest(runs[f"shards:{codec}"])
        ratio = run.per_core / dicom.per_core
        versus_packed = f"{run.per_core / packed.per_core:.1f}x" if packed else "-"
        print(
            f"| shards, {codec} | {run.samples} | {1000 / run.per_core:.2f} | {run.per_core:.1f} | "
            f"{run.samples / run.wall:.1f} | {sizes[codec] / 1024:.0f} | {ratio:.1f}x "
            f"({'met' if ratio >= TARGET_RATIO else 'not met'}) | {versus_packed} | "
            f"{'met' if run.per_core >= TARGET_PER_CORE else 'not met'} |"
        )
    for name, label in (("dicom", "per-file DICOM, uncompressed"), ("dicom_compressed", "per-file DICOM, compressed")):
        if name in runs:
            run = fastest(runs[name])
            print(
                f"| {label} | {run.samples} | {1000 / run.per_core:.2f} | {run.per_core:.1f} | "
                f"{run.samples / run.wall:.1f} | - | - | - | - |"
            )


def report_split(runs: dict[str, list[Run]], per_shard: int) -> None:
    print()
    print(
        f"Whole shards (1 reader) vs split samples ({per_shard} readers per shard, each taking one in {per_shard} "
        f"samples), total samples/s per reader-core, fastest of {REPEATS} runs, load average "
        f"{os.getloadavg()[0]:.1f}:"
    )
    for name, each in runs.items():
        if name.startswith(("whole:", "split:")):
            print(f"  {name}: " + ", ".join(f"{run.per_core:.1f}" for run in each) + " samples/s per core")
    print()
    print(
        f"| shards, work per sample | whole: samples/s per core | split: samples/s per core | cost per sample "
        f"(<= {100 * TARGET_SPLIT_COST:.0f} %) |"
    )
    print("|---|---|---|---|")
    for codec, work in itertools.product(CODECS, WORKS):
        whole, split = fastest(runs[f"whole:{codec}:{work}"]), fastest(runs[f"split:{codec}:{work}"])
        cost = whole.per_core / split.per_core - 1  # extra CPU per sample
        print(
            f"| {codec}, {work} | {whole.per_core:.1f} | {split.per_core:.1f} | {100 * cost:+.1f} % "
            f"({'met' if cost <= TARGET_SPLIT_COST else 'not met'}) |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
