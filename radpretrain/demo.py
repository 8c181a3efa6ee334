"""The demo: the whole path on a synthetic archive, each finished stage reused on a rerun."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """The embedded default: sizes chosen so the whole path takes about 15 minutes on 2 CPU cores."""

    files: int = 2400
    seed: int = 0
    hostile: float = 0.02
    min_size: int = 320
    max_size: int = 640
    workers: int = 2
    #: Longest side of the stored shard images.
    shard_size: int = 128
    encoder: str = "resnet18"
    #: Pretraining input side: 48 px keeps a ResNet-18 step near a second on two CPU cores.
    image_size: int = 48
    tasks: dict[str, float] = field(default_factory=lambda: {"simclr": 1.0, "metadata": 0.5})
    steps: int = 200
    batch_size: int = 64
    lr: float = 2e-3
    #: Finetune sweep on the synthetic lung masks.
    label_counts: list[int] = field(default_factory=lambda: [5, 20])
    repeats: int = 3
    strategies: list[str] = field(default_factory=lambda: ["random", "full", "frozen"])
    finetune_size: int = 64
    finetune_epochs: int = 25
    test_count: int = 40


@dataclass
class Stage:
    name: str
    run: Callable[[], Any]
    seconds: float = 0.0


def run_demo(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    """Run the six stages in order; each one skips work its outputs show as finished."""
    from radpretrain.config import save_config

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "demo.yaml")
    paths = {
        "archive": out / "archive",
        "shards": out / "shards",
        "private": out / "private",
        "run": out / "pretrain-run",
        "encoder": out / "encoder",
        "sweep": out / "sweep",
    }
    results: dict[str, Any] = {"paths": paths}
    stages = [
        Stage("synth", lambda: _synth(cfg, paths)),
        Stage("shard", lambda: _shard(cfg, paths)),
        Stage("pretrain", lambda: _pretrain(cfg, paths)),
        Stage("export", lambda: _export(paths)),
        Stage("sweep", lambda: _sweep(cfg, paths)),
        Stage("report", lambda: _report(paths)),
    ]
    for number, stage in enumerate(stages, start=1):
        log.info("== demo stage %d/%d: %s ==", number, len(stages), stage.name)
        started = time.perf_counter()
        results[stage.name] = stage.run()
        stage.seconds = time.perf_counter() - started
        log.info("   %s took %.0f s", stage.name, stage.seconds)
    results["seconds"] = {stage.name: stage.seconds for stage in stages}
    return results


def _synth(cfg: DemoConfig, paths: dict[str, Path]) -> Any:
    from radpretrain.synth import generate

    return generate(
        paths["archive"],
        cfg.files,
        seed=cfg.seed,
        hostile=cfg.hostile,
        masks=True,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        workers=cfg.workers,
    )


def _shard(cfg: DemoConfig, paths: dict[str, Path]) -> Any:
    from radpretrain.shards.plan import ShardConfig
    from radpretrain.shards.run import shard

    # Small shards so that both workers and both loader processes get several each.
    config = ShardConfig(
        size=cfg.shard_size, shard_size=max(cfg.files // 24, 16), val_fraction=0.1, test_fraction=0.05, seed=cfg.seed
    )
    return shard(
        paths["archive"],
        paths["shards"],
        config,
        key=paths["private"] / "deid.key",
        private_dir=paths["private"],
        workers=cfg.workers,
    )


def _pretrain(cfg: DemoConfig, paths: dict[str, Path]) -> dict[str, Any]:
    from radpretrain.config import build
    from radpretrain.pretrain import checkpoint as ckpt
    from radpretrain.pretrain.config import PretrainConfig
    from radpretrain.pretrain.loop import pretrain, read_summary

    run = paths["run"]
    existing = ckpt.find_checkpoint(run)
    if existing is not None and ckpt.read_state(existing).step >= cfg.steps:
        log.info("   pretraining already finished at step %d; reusing %s", cfg.steps, run)
        return read_summary(run)
    settings = {
        "out": str(run),
        "data": {
            "shards": str(paths["shards"]),
            "image_size": cfg.image_size,
            "batch_size": cfg.batch_size,
            "workers": cfg.workers,
            "shuffle": 500,
        },
        "encoder": {"name": cfg.encoder},
        "tasks": cfg.tasks,
        "optim": {"lr": cfg.lr, "warmup": max(cfg.steps // 10, 1)},
        "steps": cfg.steps,
        "checkpoint_every": max(cfg.steps // 3, 1),
        "probe": {"train_samples": 1000, "val_samples": 400},
        "seed": cfg.seed,
        "resume": existing is not None,
        "cpu": True,
    }
    pretrain(build(PretrainConfig, settings))
    return read_summary(run)


def _export(paths: dict[str, Path]) -> Path:
    from radpretrain.pretrain.checkpoint import export_encoder

    if (paths["encoder"] / "encoder.json").is_file():
        log.info("   encoder already exported to %s", paths["encoder"])
        return paths["encoder"]
    return export_encoder(paths["run"], paths["encoder"])


def _sweep(cfg: DemoConfig, paths: dict[str, Path]) -> Path:
    from radpretrain.config import build
    from radpretrain.finetune.config import SweepConfig
    from radpretrain.finetune.sweep import run_sweep

    settings = {
        "finetune": {
            "cohort": str(paths["archive"] / "masks.csv"),
            "structure": "lungs",
            "encoder": str(paths["encoder"]),
            "size": cfg.finetune_size,
            "epochs": cfg.finetune_epochs,
            "batch_size": 8,
            "cpu": True,
            "seed": cfg.seed,
        },
        "label_counts": cfg.label_counts,
        "repeats": cfg.repeats,
        "strategies": cfg.strategies,
        "test_count": cfg.test_count,
        "seed": cfg.seed,
        "out": str(paths["sweep"]),
    }
    return run_sweep(build(SweepConfig, settings))


def _report(paths: dict[str, Path]) -> Any:
    from radpretrain.finetune.report import write_report

    return write_report(paths["sweep"] / "results.jsonl", paths["sweep"] / "report")


def format_summary(results: dict[str, Any]) -> str:
    """The short end-of-demo summary: where everything is and the headline numbers."""
    paths = results["paths"]
    counts = (results["shard"].manifest or {}).get("counts", {})
    probe = (results.get("pretrain") or {}).get("probe", {})
    report = results["report"]
    lines = [
        "",
        "radpretrain demo finished",
        f"  archive      {paths['archive']}  ({results['synth'].n_files} synthetic DICOM files)",
        f"  shards       {paths['shards']}  ({counts.get('files_seen', 0)} files seen: {counts.get('written', 0)} "
        f"written, {counts.get('duplicate', 0)} duplicate, {sum(counts.get('skipped', {}).values())} skipped, "
        f"{sum(counts.get('failed', {}).values())} failed; see manifest.json, errors.jsonl)",
        "  reasons      "
        + ", ".join(f"{reason} {n}" for reason, n in {**counts.get("skipped", {}), **counts.get("failed", {})}.items())
        + "  (the mask PNGs beside the images count as 'not a DICOM file')",
        f"  encoder      {paths['encoder']}  (encoder.safetensors, encoder.json)",
        f"  model card   {paths['encoder'] / 'README.md'}",
        f"  sweep table  {report.markdown}",
        f"  plot         {report.plot}",
    ]
    scores = {k: v for k, v in probe.items() if k.startswith(("knn/", "linear/"))}
    if scores:
        lines.append("  probes (val) " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items())))
    lines.append("")
    lines.append(Path(report.markdown).read_text().split("\n### Paired")[0].strip())
    return "\n".join(lines)
