"""Training images/s per GPU of `radpretrain pretrain` fed by the real shard loader: ResNet-50 SimCLR and DINO ViT-S/16.

    python bench/throughput.py                 # every visible GPU; sized for under 8 minutes on one GPU, 16 cores
    python bench/throughput.py --gpus 1        # one GPU; with N > 1 the rows run under `accelerate launch`
    python bench/throughput.py --cpu-smoke     # no GPU needed: both rows at tiny settings on the CPU, end to end

Without a CUDA GPU (and without --cpu-smoke) it prints one line and exits 0: there is nothing to measure.
On one GPU with 16 cores the defaults synthesise about 27,000 radiographs (about 26 GB on disk until sharded,
7 GB of shards kept in --workdir for the next run) and train 80 steps of 256 images per row. N GPUs read N times
the images (each process reads its own share of one epoch): set --images and --timed to fit the time and disk.

What runs: a synthetic archive (`radpretrain.synth.archive.generate`, uncompressed radiographs of 512-1024 px)
is sharded by `radpretrain.shards.run.shard` at the stored size users shard at (512 px, 16-bit PNG; the key file
sits in the work folder, outside the shards); both are reused from --workdir when the settings match, and the
archive is deleted once sharded (--keep-archive keeps it). Then each row is a real `radpretrain pretrain` run
(the command line's own entry, `radpretrain.cli.main`, in a child process; `accelerate launch --multi_gpu` for
more than one GPU) of the shipped config with only what a throughput run must change:
- simclr: configs/pretrain/simclr.yaml with encoder.name=resnet50: two strong 224 px views per image;
- dino: configs/pretrain/dino.yaml (vit_small_patch16_224, dynamic_img_size, 65536 prototypes): two global 224 px
  views + 8 local 96 px crops per image, with the head's last layer trained from step 1 (freeze_last_layer_steps=0:
  the config freezes it for its first 1,250 steps, which skips its update; a long run is unfrozen for 95 % of it);
- both: precision=bf16, data.batch_size per GPU (256), data.workers = cores per GPU, steps = warm-up + timed,
  log_every=1, no checkpoint or probe until the end (the final ones fall outside the timed steps), small probes.

Read from the run: images/s per GPU is the log's `images_per_s` (RUN/log.jsonl: global batch = batch x processes,
counted in images, i.e. samples with all their views, per wall second of rank 0 between log lines) over the timed
steps, divided by the processes. The first steps are excluded: 2 x workers of them by default, because the
DataLoader starts with up to 2 batches per worker in flight, which would flatter a loader-bound rate; the timed
steps are a multiple of the workers, since each worker delivers whole batches. The archive holds enough train
images that no process starts a second epoch (a new epoch restarts the loader workers, rare in a real archive).
The loader wait is the share of the timed wall time the loop spent in `next(batch)` (timed here by a subclass of
`pretrain.stream.BatchStream`, the loop's only data source; mean over processes): an upper bound of the GPU time
lost to data, since the GPU may still be finishing the previous step's update while the loop waits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "pretrain"
NO_GPU = "no GPU: the images/s-per-GPU figures need a CUDA GPU; nothing measured"
RESULT = "bench-rank{rank}.json"  # what each process of a row writes beside its run: loader waits, device


@dataclass(frozen=True)
class Row:
    """One measured run: a shipped config, the encoder it trains, and its tiny CPU-smoke twin."""

    name: str
    label: str
    config: str
    encoder: str
    smoke_encoder: str
    task: str


ROWS = {
    "simclr": Row("simclr", "SimCLR", "simclr.yaml", "resnet50", "test_resnet", "simclr"),
    "dino": Row("dino", "DINO multi-crop", "dino.yaml", "vit_small_patch16_224", "test_vit", "dino"),
}
#: Smoke-sized heads (the real ones, e.g. DINO's 65536 prototypes, would dominate a 64 px CPU run).
SMOKE_OPTIONS: dict[str, dict[str, Any]] = {
    "simclr": {"hidden_dim": 256, "output_dim": 64},
    "dino": {"hidden_dim": 256, "bottleneck_dim": 64, "output_dim": 1024},
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(Path(args.child))
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not args.cpu_smoke and gpus == 0:
        print(NO_GPU)
        return 0
    if not args.cpu_smoke and args.gpus > gpus:
        print(f"--gpus {args.gpus} asks for more GPUs than the {gpus} visible; use --gpus {gpus} or fewer")
        return 2
    settle(args, gpus)
    started = time.perf_counter()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"work folder {workdir}; {args.processes} process(es) x {args.workers} loader worker(s), batch {args.batch} "
        f"per process, {args.warmup} warm-up + {args.timed} timed steps; archive of {args.images} radiographs",
        flush=True,
    )
    warn_shared_memory(args)
    phases: dict[str, float] = {}
    shards = prepare_shards(args, workdir, phases)
    results = []
    for name in args.rows:
        start = time.perf_counter()
        print(f"{name}: training ({args.warmup + args.timed} steps) ...", flush=True)
        result = run_row(args, ROWS[name], shards, workdir)
        phases[name] = time.perf_counter() - start
        print(f"{name}: {'done' if result.get('error') is None else 'FAILED'} in {phases[name]:.0f} s", flush=True)
        results.append(result)
    phases["total"] = time.perf_counter() - started
    report(args, shards, results, phases)
    return 1 if any(result.get("error") for result in results) else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, help="processes, one per GPU (all visible GPUs; --cpu-smoke: 1)")
    parser.add_argument("--workers", type=int, help="loader workers per process (cores per GPU; --cpu-smoke: 1)")
    parser.add_argument("--batch", type=int, help="batch size per process (256; --cpu-smoke: 8)")
    parser.add_argument("--warmup", type=int, help="steps excluded before the timed ones (2 x workers, at least 10)")
    parser.add_argument("--timed", type=int, help="timed steps (3 x workers, at least 24)")
    parser.add_argument(
        "--images", type=int, help="radiographs in the archive (enough train images for every step of one epoch)"
    )
    parser.add_argument("--min-size", type=int, help="shortest long side of the synthetic radiographs (512)")
    parser.add_argument("--max-size", type=int, help="longest long side of the synthetic radiographs (1024)")
    parser.add_argument("--shard-px", type=int, help="stored size of the shards, `shard --size` (512)")
    parser.add_argument("--codec", choices=("png", "blosc2"), default="png", help="pixel codec of the shards (png)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows ({','.join(ROWS)})")
    parser.add_argument("--workdir", help="archive, shards and runs; reused when the settings match")
    parser.add_argument("--keep-archive", action="store_true", help="keep the DICOM archive after sharding it")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="check the script end to end on the CPU: test_resnet / test_vit at 64 px, batch 8, 3 steps, fp32",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a row's run file: run it in this process
    args = parser.parse_args(argv)
    args.rows = [name.strip() for name in args.rows.split(",") if name.strip()]
    unknown = [name for name in args.rows if name not in ROWS]
    if unknown:
        parser.error(f"unknown row {', '.join(unknown)}; known: {', '.join(ROWS)}")
    return args


def settle(args: argparse.Namespace, gpus: int) -> None:
    """Fill the defaults that depend on the mode (GPU or CPU smoke), the GPUs and the cores."""
    cores = len(os.sched_getaffinity(0))
    smoke = args.cpu_smoke
    args.processes = args.gpus or (1 if smoke else gpus)
    args.cores = cores
    args.workers = args.workers if args.workers is not None else (1 if smoke else max(1, cores // args.processes))
    args.batch = args.batch or (8 if smoke else 256)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else max(10, 2 * args.workers))
    args.timed = args.timed or (2 if smoke else max(24, 3 * args.workers))
    args.image_size = 64 if smoke else 224
    args.min_size = args.min_size or (96 if smoke else 512)
    args.max_size = args.max_size or (160 if smoke else 1024)
    args.shard_px = args.shard_px or (96 if smoke else 512)
    args.precision = "no" if smoke else "bf16"
    # The val split only feeds the final probe (256 images; 16 in the smoke run): a small share of a big archive.
    args.val_fraction = 0.25 if smoke else 0.02
    # Every step reads from the first epoch (30 % spare: patients split unevenly, readers hold unequal shares).
    read = (args.warmup + args.timed) * args.batch * args.processes
    args.images = args.images or max(96, math.ceil(1.3 * read / (1 - args.val_fraction)))
    # About two train shards per reader (process x worker): every reader reads whole shards, none idles early.
    readers = args.processes * max(1, args.workers)
    args.shard_size = max(1, math.ceil(args.images * (1 - args.val_fraction) / (2 * readers)))
    default_dir = "radpretrain-bench-throughput" + ("-smoke" if smoke else "")
    args.workdir = args.workdir or str(Path(tempfile.gettempdir()) / default_dir)


def warn_shared_memory(args: argparse.Namespace) -> None:
    """Loader workers hand batches over in /dev/shm; a container's small default (64 MiB) fails mid-run."""
    # Up to 2 batches in flight per worker, 4 bytes per pixel of DINO's 2 global + 8 local views (the larger row).
    pixels = 2 * args.image_size**2 + 8 * (args.image_size * 3 // 7) ** 2
    need = 2 * args.workers * args.processes * args.batch * pixels * 4
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return
    if free < need:
        print(
            f"warning: /dev/shm has {free / 2**30:.1f} GiB free and the loader may hold {need / 2**30:.1f} GiB of "
            "batches there; give the container more (docker --shm-size) or lower --workers",
            flush=True,
        )


# Data: synthetic archive -> shards, reused when the settings match.


def prepare_shards(args: argparse.Namespace, workdir: Path, phases: dict[str, float]) -> Path:
    """The shards of `args`' archive in workdir/shards: reused when settings.json matches, else made."""
    from radpretrain import files

    settings = {
        "images": args.images,
        "seed": 1,
        "min_size": args.min_size,
        "max_size": args.max_size,
        "syntax": "ExplicitVRLittleEndian",
        "shard_px": args.shard_px,
        "shard_size": args.shard_size,
        "codec": args.codec,
        "val_fraction": args.val_fraction,
    }
    stamp, shards, archive = workdir / "settings.json", workdir / "shards", workdir / "archive"
    if stamp.is_file() and (shards / "manifest.json").is_file():
        changed = files.changed_settings(json.loads(stamp.read_text()), settings)
        if not changed:
            print(f"shards: reusing {shards}", flush=True)
            phases["synthesis"] = phases["sharding"] = 0.0
            return shards
        print(f"shards: settings changed ({'; '.join(changed)}): making them again", flush=True)
    stamp.unlink(missing_ok=True)
    for old in (shards, workdir / "shards.private"):
        shutil.rmtree(old, ignore_errors=True)

    from radpretrain.shards.plan import ShardConfig
    from radpretrain.shards.run import shard
    from radpretrain.synth.archive import generate

    start = time.perf_counter()
    generate(
        archive,
        args.images,
        seed=settings["seed"],
        min_size=args.min_size,
        max_size=args.max_size,
        syntaxes=[settings["syntax"]],
        workers=args.cores,
        overwrite=True,
        progress=False,
    )
    phases["synthesis"] = time.perf_counter() - start
    print(f"synthesis: {args.images} radiographs in {phases['synthesis']:.0f} s", flush=True)
    start = time.perf_counter()
    config = ShardConfig(
        size=args.shard_px,
        shard_size=args.shard_size,
        val_fraction=args.val_fraction,
        test_fraction=0.0,
        codec=args.codec,
    )
    result = shard(archive, shards, config, key=workdir / "deid.key", workers=args.cores, progress=False)
    phases["sharding"] = time.perf_counter() - start
    if not result.complete:
        raise SystemExit(f"sharding {archive} did not complete; see {shards}/errors.jsonl")
    print(f"sharding: {result.files_processed} files in {phases['sharding']:.0f} s", flush=True)
    files.write_text(stamp, json.dumps(settings, indent=1) + "\n")
    if not args.keep_archive:
        shutil.rmtree(archive, ignore_errors=True)  # the runs read only the shards
    return shards


# Runs: one child process per row (accelerate launch for several GPUs), each writing its own results.


def row_overrides(args: argparse.Namespace, row: Row, shards: Path, run: Path) -> list[str]:
    """The `key=value` list of `row`'s run on top of its shipped config."""
    from radpretrain.config import read_yaml

    options = dict(read_yaml(CONFIGS / row.config).get("task_options", {}).get(row.task, {}))
    if row.task == "dino":
        options["freeze_last_layer_steps"] = 0  # the steady state of a run: the last layer is updated
    if args.cpu_smoke:
        options.update(SMOKE_OPTIONS[row.task])
    probe = 16 if args.cpu_smoke else 256
    overrides = [
        f"data.shards={shards}",
        f"out={run}",
        f"encoder.name={row.smoke_encoder if args.cpu_smoke else row.encoder}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch}",
        f"data.workers={args.workers}",
        f"precision={args.precision}",
        f"steps={args.warmup + args.timed}",
        "log_every=1",
        "checkpoint_every=0",
        "probe_every=0",
        f"probe.train_samples={probe}",
        f"probe.val_samples={probe}",
        f"task_options={json.dumps({row.task: options})}",
    ]
    if args.cpu_smoke:
        overrides += ["cpu=true", "augment.local_size=32", "probe.k=3"]  # 32 px local crops: a multiple of 16
    return overrides


def run_row(args: argparse.Namespace, row: Row, shards: Path, workdir: Path) -> dict[str, Any]:
    """Train `row` in a child process (or N under accelerate launch); its log and per-process results."""
    from radpretrain.config import load_config
    from radpretrain.data.transforms import local_view_size
    from radpretrain.pretrain.config import PretrainConfig

    run = workdir / "runs" / row.name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    overrides = row_overrides(args, row, shards, run)
    cfg = load_config(PretrainConfig, CONFIGS / row.config, overrides)  # refused here, not in the child
    spec = run.parent / f"{row.name}.json"
    spec.write_text(json.dumps({"config": str(CONFIGS / row.config), "overrides": overrides}, indent=1) + "\n")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec)]
    if args.processes > 1:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(args.processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            args.precision,
            "--dynamo_backend",
            "no",
            *command[1:],
        ]
    output = run.parent / f"{row.name}-output.txt"
    with output.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
    local = local_view_size(cfg.data.image_size, cfg.augment.local_size)
    views = [(2, cfg.data.image_size)]
    if row.task == "dino":
        views.append((int(cfg.task_options["dino"].get("local_views", 8)), local))
    result: dict[str, Any] = {"row": row, "encoder": cfg.encoder.name, "views": views, "output": output}
    if code != 0:
        tail = output.read_text(errors="replace").splitlines()[-25:]
        print("\n".join(f"    {line}" for line in tail), flush=True)
        result["error"] = f"exit code {code}; see {output}"
        return result
    try:
        result.update(read_run(args, run))
    except (OSError, ValueError, KeyError) as exc:
        result["error"] = f"{exc}; see {run}"
    return result


def read_run(args: argparse.Namespace, run: Path) -> dict[str, Any]:
    """Images/s per process, ms per step and loader wait over the timed steps, from the log and the results."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    first, last = args.warmup + 1, args.warmup + args.timed
    timed = [r for r in records if first <= r["step"] <= last]
    if len(timed) != args.timed:
        raise ValueError(f"the log has {len(timed)} of the {args.timed} timed steps {first}-{last}")
    per_step = args.batch * args.processes  # what the loop counts: the global batch (accumulation 1)
    seconds = sum(per_step / r["images_per_s"] for r in timed)
    ranks = [json.loads(path.read_text()) for path in sorted(run.glob(RESULT.format(rank="*")))]
    if len(ranks) != args.processes:
        raise ValueError(f"{len(ranks)} of {args.processes} processes wrote their results")
    waits = [sum(r["waits"][first - 1 : last]) / seconds for r in ranks]
    restarts = max(r["epochs"][last - 1] - r["epochs"][first - 1] for r in ranks)
    return {
        "images_per_s": args.timed * args.batch / seconds,  # per process: the global rate / processes
        "ms_per_step": 1000 * seconds / args.timed,
        "wait": sum(waits) / len(waits),
        "wait_max": max(waits),
        "epoch_restarts": restarts,
        "peak_gib": max(r["peak_bytes"] for r in ranks) / 2**30,
        "device": ranks[0]["device"],
        "loss": timed[-1]["loss"],
    }


def child(spec_path: Path) -> int:
    """Run one row's `radpretrain pretrain` in this process, timing the loop's waits for the loader."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as cli.main does, before torch is imported
    import torch

    from radpretrain.cli import main as cli_main
    from radpretrain.pretrain import stream

    spec = json.loads(spec_path.read_text())
    waits: list[float] = []
    epochs: list[int] = []

    class TimedBatchStream(stream.BatchStream):
        """The loop's data source, unchanged, with the time each `next(batch)` blocked and the epoch it read."""

        def __next__(self) -> dict[str, torch.Tensor]:
            start = time.perf_counter()
            batch = super().__next__()
            waits.append(time.perf_counter() - start)
            epochs.append(self.epoch)
            return batch

    stream.BatchStream = TimedBatchStream  # type: ignore[misc]  # the loop builds stream.BatchStream(...)
    code = cli_main(["pretrain", spec["config"], *spec["overrides"]])
    if code != 0:
        return code
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() and not any(o == "cpu=true" for o in spec["overrides"])
    device = torch.cuda.get_device_name() if cuda else "CPU"
    out = next(Path(o.split("=", 1)[1]) for o in spec["overrides"] if o.startswith("out="))
    result = {
        "rank": rank,
        "waits": waits,
        "epochs": epochs,
        "device": device,
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
    }
    (out / RESULT.format(rank=rank)).write_text(json.dumps(result) + "\n")
    return 0


# Report.


def machine(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    """GPUs, cores, CPU model, memory, versions and load: the line that says where the figures come from."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (OSError, ValueError):
        memory = float("nan")
    import torch

    done = [r for r in results if "device" in r]
    device = done[0]["device"] if done else "?"
    accelerator = "CPU only (smoke)" if args.cpu_smoke else f"{args.processes} x {device}"
    return (
        f"{accelerator}; {args.cores} cores ({cpu}), {memory:.0f} GiB RAM; torch {torch.__version__}"
        + (f", CUDA {torch.version.cuda}" if torch.version.cuda and not args.cpu_smoke else "")
        + f"; load average {os.getloadavg()[0]:.1f}"
    )


def report(args: argparse.Namespace, shards: Path, results: list[dict[str, Any]], phases: dict[str, float]) -> None:
    from radpretrain.shards.format import ShardSet

    shard_set = ShardSet.open(shards)
    train = shard_set.samples("train")
    mode = "CPU SMOKE RUN, not a throughput figure: " if args.cpu_smoke else ""
    print()
    print(
        f"{mode}Training throughput per GPU, `radpretrain pretrain` fed by the shard loader "
        f"(`bench/throughput.py{' --cpu-smoke' if args.cpu_smoke else ''}`)."
    )
    print(f"Machine: {machine(args, results)}.")
    print(
        f"Data: {args.images} synthetic radiographs ({args.min_size}-{args.max_size} px, uncompressed) sharded at "
        f"{args.shard_px} px, {args.codec}: {train} train samples in {len(shard_set.urls('train'))} shards, read "
        "from the page cache (just written or read)."
    )
    print(
        f"Per process: batch {args.batch}, {args.workers} loader worker(s), precision {args.precision}, AdamW; "
        f"{args.processes} process(es); {args.warmup} warm-up steps excluded, {args.timed} timed steps."
    )
    print()
    print(
        "| row | encoder | views per image | images/s per GPU | views/s per GPU | ms per step | loader wait | "
        "peak GPU memory | loss at the last step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        views = " + ".join(f"{count} x {side} px" for count, side in r["views"])
        if r.get("error"):
            print(f"| {r['row'].label} | {r['encoder']} | {views} | failed: {r['error']} | | | | | |")
            continue
        count = sum(count for count, _ in r["views"])
        wait = f"{r['wait']:.0%}" + (f" (max {r['wait_max']:.0%})" if args.processes > 1 else "")
        memory = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] else "-"
        print(
            f"| {r['row'].label} | {r['encoder']} | {views} | {r['images_per_s']:.1f} | "
            f"{r['images_per_s'] * count:.0f} | {r['ms_per_step']:.0f} | {wait} | {memory} | {r['loss']:.3f} |"
        )
    print()
    print(
        "images/s per GPU: images (samples, each with all its views) per second and per process over the timed "
        "steps: RUN/log.jsonl's images_per_s counts the global batch (batch x processes) per wall second of "
        "rank 0, divided here by the processes. views/s: the same times the views per image. loader wait: share "
        "of the timed wall time the loop spent waiting in next(batch) (mean over processes): an upper bound of the "
        "GPU time lost to data."
    )
    restarts = [r["row"].name for r in results if r.get("epoch_restarts")]
    if restarts:
        print(f"Warning: {', '.join(restarts)} started a new epoch inside the timed steps; raise --images.")
    shown = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items())
    print(f"Wall time of each phase: {shown}.")


if __name__ == "__main__":
    raise SystemExit(main())
