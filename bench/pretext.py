"""Pretext tasks compared fairly: one encoder, the same data, steps and seeds, scored on a cohort no task saw.

    python bench/pretext.py --workdir runs/pretext                  # 2 seeds: about 28 min on one core
    python bench/pretext.py --workdir runs/pretext --seeds 0,1,2    # the README table: 42 min (resumes the above)
    python bench/pretext.py --workdir runs/pretext-quick --quick    # every task runs? (1 seed, 20 steps, 1 min)
    python bench/pretext.py --workdir runs/pretext --tasks simclr,random

What runs: a synthetic PACS export (`radpretrain synth`, all body parts, lung findings in some chest
radiographs, no labels used) sharded at the run's image size (`radpretrain.shards.run.shard`, a fixed key file
beside the shards); a separate labeled chest cohort from another seed (other patients; `--findings 0.5`, its
findings.csv is the cohort) that is never sharded; then for every task and every seed one
`radpretrain.pretrain.loop.pretrain` run with identical settings (encoder, image size, batch, steps, AdamW
schedule, augmentations, data order by seed) and `probe.cohort=` the cohort. "random init" is the same encoder
with the seed's initial weights, probed by the same function the loop calls at its last step. The score is the
cohort probe of `radpretrain.pretrain.probe` (kNN and logistic regression on frozen features, patient-level
cross-validation): AUROC and balanced accuracy of finding vs normal. `metadata` trains on the header labels
(body part, age bucket, sex, view), none of which is the finding.

Resumable: a (task, seed) whose result file exists is not run again; a run cut short is started afresh. The
table is sorted by linear AUROC; the header-label probes of the same runs follow, marked where a task trained
on the label.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

RANDOM = "random"
#: What `metadata` learns to predict: every header label of the shard format (none of them is the finding).
HEADER_LABELS = ["body_part", "age_bucket", "sex", "view"]
#: Pretext tasks by bench name: (tasks, task_options). Heads are sized for a tiny encoder on a CPU; the
#: momentum encoders start at 0.99 and the memory bank and DINO's frozen last layer fit a run of a few hundred
#: steps (the paper values assume hundreds of thousands). Everything else is each task's default.
TASKS: dict[str, tuple[dict[str, float], dict[str, dict[str, Any]]]] = {
    "simclr": ({"simclr": 1.0}, {}),
    "byol": ({"byol": 1.0}, {}),
    "moco": ({"moco": 1.0}, {"moco": {"memory_bank_size": 1024, "momentum": 0.99}}),
    "vicreg": ({"vicreg": 1.0}, {"vicreg": {"hidden_dim": 512, "output_dim": 512}}),
    "barlow_twins": ({"barlow_twins": 1.0}, {"barlow_twins": {"hidden_dim": 512, "output_dim": 512}}),
    "dino": (
        {"dino": 1.0},
        {"dino": {"hidden_dim": 512, "bottleneck_dim": 128, "output_dim": 4096, "local_views": 4, "momentum": 0.99}},
    ),
    "patch_ae": ({"patch_ae": 1.0}, {"patch_ae": {"patch_size": 8}}),
    "metadata": ({"metadata": 1.0}, {"metadata": {"labels": HEADER_LABELS}}),
    "simclr+metadata": ({"simclr": 1.0, "metadata": 0.5}, {"metadata": {"labels": HEADER_LABELS}}),
}
ALL = (*TASKS, RANDOM)
SHOWN = {RANDOM: "random init"}
COHORT_KEYS = (
    "knn_auroc/cohort",
    "linear_auroc/cohort",
    "knn_balanced_accuracy/cohort",
    "linear_balanced_accuracy/cohort",
)
RESULT = "bench-result.json"  # in each run folder, written last: the (task, seed) is done for these settings
TIMES = "bench-times.json"  # wall seconds of the data stages
DATA = "bench-data.json"  # the data settings of the workdir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="folder for the data and runs (reused: resumable)")
    parser.add_argument("--tasks", default=",".join(ALL), help=f"comma-separated, from {','.join(ALL)}")
    parser.add_argument("--seeds", default="0,1", help="pretraining (and random-init) seeds (0,1)")
    parser.add_argument("--encoder", default="test_resnet", help="timm encoder (test_resnet, 0.37 M parameters)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels, shards and runs (64)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (32)")
    parser.add_argument("--steps", type=int, default=500, help="pretraining steps per run (500)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (2e-3)")
    parser.add_argument("--files", type=int, default=3000, help="files in the pretraining archive (3000)")
    parser.add_argument("--findings", type=float, default=0.25, help="share of its chest radiographs with one")
    parser.add_argument("--cohort-files", type=int, default=800, help="chest radiographs in the cohort (800)")
    parser.add_argument("--archive-seed", type=int, default=21)
    parser.add_argument("--cohort-seed", type=int, default=22)
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 steps, 300 files, 200 cohort images")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.files, args.cohort_files = "0", 20, 300, 200
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    unknown = [name for name in tasks if name not in ALL]
    if unknown:
        parser.error(f"unknown task {', '.join(unknown)}; known: {', '.join(ALL)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = data_settings(args)
    saved = read_json(work / DATA)
    if saved and saved != data:
        changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in data.items() if saved.get(k) != v)
        raise SystemExit(f"{work} holds the data of other settings ({changed}); choose another --workdir")
    write_json(work / DATA, data)
    times = read_json(work / TIMES)
    archive, shards, cohort = work / "archive", work / "shards", work / "cohort"
    for name, done, job in (
        ("synth archive", archive / "synth.json", partial(synth_archive, args, archive)),
        ("shard", shards / "manifest.json", partial(shard_archive, args, archive, shards, work / "deid.key")),
        ("synth cohort", cohort / "synth.json", partial(synth_cohort, args, cohort)),
    ):
        if not done.is_file():  # a stage cut short resumes; its time is that of the run that finished it
            tick = time.perf_counter()
            job()
            times[name] = time.perf_counter() - tick
            write_json(work / TIMES, times)
    table = cohort / "findings.csv"
    results: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        for seed in seeds:
            run = work / "runs" / f"{task}-seed{seed}"
            result = read_json(run / RESULT)
            if result.get("settings") != run_settings(args, task):
                print(f"{task} seed {seed} ...", flush=True)
                result = run_one(args, task, seed, shards, table, run)
            results.setdefault(task, []).append(result)
    report(args, argv, tasks, seeds, results, table, times, time.perf_counter() - started)
    return 0


def data_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the archive, the shards and the cohort depend on."""
    names = ("files", "findings", "archive_seed", "cohort_files", "cohort_seed", "size")
    return {**{name: getattr(args, name) for name in names}, **SIZES}


def run_settings(args: argparse.Namespace, task: str) -> dict[str, Any]:
    """What one run's result depends on besides its seed; a result of other settings is run again."""
    names = ("encoder", "size") if task == RANDOM else ("encoder", "size", "batch", "steps", "lr")
    settings = {**{name: getattr(args, name) for name in names}, "task": TASKS.get(task), "data": data_settings(args)}
    return dict(json.loads(json.dumps(settings)))  # as the result file holds them


# ---------------------------------------------------------------------------------------------------------------
# Data: the archive (sharded, findings unlabeled) and the separate labeled cohort.
# ---------------------------------------------------------------------------------------------------------------

SIZES = {"min_size": 128, "max_size": 256}  # drawn at 2-4x the run's 64 px, so resizing smooths as in real data


def synth_archive(args: argparse.Namespace, out: Path) -> None:
    from radpretrain.synth.archive import generate

    generate(out, args.files, seed=args.archive_seed, findings=args.findings, progress=False, **SIZES)


def shard_archive(args: argparse.Namespace, archive: Path, out: Path, key: Path) -> None:
    from radpretrain.shards.plan import ShardConfig
    from radpretrain.shards.run import shard

    if (out / "manifest.json").is_file():
        return
    config = ShardConfig(size=args.size, shard_size=100, val_fraction=0.1, test_fraction=0.0)
    result = shard(archive, out, config, key=key, progress=False)
    if not result.complete:
        raise SystemExit(f"sharding {archive} did not complete; run the bench again to resume it")


def synth_cohort(args: argparse.Namespace, out: Path) -> None:
    from radpretrain.synth.archive import generate

    generate(out, args.cohort_files, seed=args.cohort_seed, findings=0.5, body_parts=["chest"], progress=False, **SIZES)


# ---------------------------------------------------------------------------------------------------------------
# Runs.
# ---------------------------------------------------------------------------------------------------------------


def run_config(args: argparse.Namespace, task: str, seed: int, shards: Path, cohort: Path, run: Path) -> Any:
    """The PretrainConfig of one run: everything but the task, its options and the seed is the same for all."""
    from radpretrain.config import load_config
    from radpretrain.pretrain.config import PretrainConfig

    tasks, options = TASKS.get(task, ({"simclr": 1.0}, {}))  # random init: any task; it is never trained
    options = json.loads(json.dumps(options))
    if "dino" in options:
        options["dino"]["freeze_last_layer_steps"] = max(args.steps // 10, 1)
    common = [
        f"data.shards={shards}",
        f"out={run}",
        f"encoder.name={args.encoder}",
        f"data.image_size={args.size}",
        f"data.batch_size={args.batch}",
        "data.workers=0",
        "data.shuffle=1000",
        f"steps={args.steps}",
        f"optim.lr={args.lr}",
        "optim.weight_decay=1.0e-4",
        f"optim.warmup={max(args.steps // 15, 1)}",
        "checkpoint_every=0",
        "probe_every=0",
        f"log_every={max(args.steps // 10, 1)}",
        "probe.train_samples=1000",
        "probe.val_samples=500",
        f"probe.cohort={cohort}",
        "cpu=true",
        f"seed={seed}",
    ]
    return load_config(
        PretrainConfig, None, [*common, f"tasks={json.dumps(tasks)}", f"task_options={json.dumps(options)}"]
    )


def run_one(args: argparse.Namespace, task: str, seed: int, shards: Path, cohort: Path, run: Path) -> dict[str, Any]:
    """Train (or, for random init, only build) and probe; returns and writes the run's result."""
    if run.exists():
        shutil.rmtree(run)  # cut short last time (its result file is written last): start afresh
    cfg = run_config(args, task, seed, shards, cohort, run)
    tick = time.perf_counter()
    if task == RANDOM:
        probe = probe_untrained(cfg)
    else:
        from radpretrain.pretrain.loop import pretrain

        probe = pretrain(cfg).probe
    result = {
        "task": task,
        "seed": seed,
        "settings": run_settings(args, task),
        "wall_s": time.perf_counter() - tick,
        "probe": probe,
    }
    write_json(run / RESULT, result)
    return result


def probe_untrained(cfg: Any) -> dict[str, float]:
    """The seed's initial encoder (as `pretrain` builds it) scored by the loop's own probe function."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from radpretrain.models.encoders import build_encoder
    from radpretrain.pretrain.loop import build_cohort_probe, run_probe
    from radpretrain.shards.format import ShardSet

    accelerator = Accelerator(cpu=True)
    set_seed(cfg.seed)
    encoder = build_encoder(cfg.encoder.name, img_size=cfg.data.image_size, **cfg.encoder.options)
    cohort = build_cohort_probe(cfg, accelerator.process_index, accelerator.num_processes)
    scores: dict[str, float] = run_probe(accelerator, encoder, cfg, ShardSet.open(cfg.data.shards), 0, cohort)
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({statistics.stdev(values):.3f})"


def report(
    args: argparse.Namespace,
    argv: list[str],
    tasks: list[str],
    seeds: list[int],
    results: dict[str, list[dict[str, Any]]],
    cohort: Path,
    times: dict[str, float],
    wall: float,
) -> None:
    from radpretrain.data.cohorts import load_cohort

    cases = load_cohort(cohort)
    positives = sum(1 for case in cases.cases if cases.classes[case.target] == "abnormal")  # type: ignore[index]
    scores = {task: {key: [r["probe"][key] for r in results[task]] for key in COHORT_KEYS} for task in tasks}
    order = sorted(tasks, key=lambda t: -statistics.mean(scores[t]["linear_auroc/cohort"]))
    print()
    print(
        f"Cohort probe: {len(cases.cases)} chest radiographs of {len(cases.patients())} patients, {positives} with a "
        f"lung finding; 5-fold patient-level cross-validation; mean (sd) over seeds {','.join(map(str, seeds))}. "
        f"{args.encoder} at {args.size} px, batch {args.batch}, {args.steps} steps, AdamW lr {args.lr:g}, "
        f"pretrained on {args.files} synthetic files ({args.findings:g} of the chest radiographs with a finding):"
    )
    print()
    print("| task | kNN AUROC | linear AUROC | kNN bal. acc | linear bal. acc | seeds |")
    print("|---|---|---|---|---|---|")
    for task in order:
        s = scores[task]
        cells = [mean_sd(s[key]) for key in COHORT_KEYS]
        print(f"| {SHOWN.get(task, task)} | {' | '.join(cells)} | {len(results[task])} |")
    print()
    print("Header-label probes of the same runs (val split, accuracy; * = the task trained on this label):")
    print()
    labels = ("body_part", "age_bucket")
    print("| task | " + " | ".join(f"kNN {name} | linear {name}" for name in labels) + " |")
    print("|---|" + "---|---|" * len(labels))
    for task in order:
        trained = set(TASKS[task][1].get("metadata", {}).get("labels", [])) if task in TASKS else set()
        cells = []
        for name in labels:
            mark = "*" if name in trained else ""
            for kind in ("knn", "linear"):
                values = [r["probe"].get(f"{kind}/{name}") for r in results[task]]
                cells.append(mean_sd([v for v in values if v is not None]) + mark if None not in values else "-")
        print(f"| {SHOWN.get(task, task)} | {' | '.join(cells)} |")
    print()
    runs = sum(r["wall_s"] for task in tasks for r in results[task])
    slowest = max(tasks, key=lambda t: sum(r["wall_s"] for r in results[t]))
    print(f"Command: python bench/pretext.py {shlex.join(argv)}")
    print(
        f"Wall time: {(sum(times.values()) + runs) / 60:.1f} min for all stages (synth "
        f"{times.get('synth archive', 0):.0f} s + {times.get('synth cohort', 0):.0f} s, shard "
        f"{times.get('shard', 0):.0f} s, runs {runs / 60:.1f} min, the slowest task {SHOWN.get(slowest, slowest)} "
        f"{statistics.mean(r['wall_s'] for r in results[slowest]):.0f} s a run); this invocation "
        f"{wall / 60:.1f} min; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}."
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    from radpretrain.files import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(data, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
