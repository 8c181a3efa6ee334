"""A shard run: index (or reuse it) -> plan -> the units not written yet -> the manifest once all are."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radpretrain import files
from radpretrain.errors import ShardError
from radpretrain.shards import deid, gpu_decode, ocr, pool
from radpretrain.shards.format import ERRORS, MANIFEST, PLAN_FILE, STATS_SUFFIX, TAR_SUFFIX
from radpretrain.shards.index import check_source, current_index, private_dir_for, read_private_paths
from radpretrain.shards.manifest import vocabulary, write_manifest
from radpretrain.shards.plan import Plan, ShardConfig, make_plan, read_plan, select_part
from radpretrain.shards.sample import WriterSettings
from radpretrain.shards.writer import UnitTask, clean_temp, is_done

log = logging.getLogger(__name__)


@dataclass
class ShardSummary:
    """What a run did: whether the shard folder is complete, and how many units it wrote or found done."""

    out: Path
    private_dir: Path
    complete: bool
    units_total: int
    units_written: int
    units_skipped: int
    manifest: dict[str, Any] | None
    seconds: float
    files_processed: int


def shard(
    src: str | Path,
    out: str | Path,
    config: ShardConfig | None = None,
    *,
    key: str | Path | None = None,
    private_dir: str | Path | None = None,
    workers: int = 1,
    part: tuple[int, int] | None = None,
    overwrite: bool = False,
    reindex: bool = False,
    progress: bool = True,
    decoder: str = "cpu",
) -> ShardSummary:
    """Index (or reuse the index), plan, write the units not done yet, and write the manifest when all are.

    With `part=(i, N)` only units i, i+N, ... are written; whichever run finds every unit done writes
    manifest.json and errors.jsonl (a final run without `part` does it too, writing nothing else).
    `decoder` (`gpu_decode.DECODERS`): who decodes JPEG 2000 / HTJ2K / baseline JPEG; the manifest's `decode`
    counts the path each file took. Like `workers`, it is not part of the plan. "cpu" here, so a library call
    gives the same pixels on every machine; the command line's default is "auto".
    """
    started = time.perf_counter()
    config = config or ShardConfig()
    if config.scan_text != "off":
        ocr.require_engine()  # before hours of indexing
    run_decoder = gpu_decode.resolve(decoder)
    src_path = check_source(src, out)
    out_path = Path(out).expanduser().resolve()
    private = private_dir_for(out_path, private_dir)
    pseudonymize = deid.Pseudonymizer(deid.load_key(key, out=out_path))
    deid.quiet_header_echo()

    # One pool of worker processes for both passes (started on first use; none for a single worker).
    with pool.WorkerPool(workers) if workers > 1 else contextlib.nullcontext() as workers_pool:
        index = current_index(
            src_path,
            out_path,
            config.index,
            pseudonymize,
            private_dir=private,
            workers=workers,
            progress=progress,
            part=part,
            overwrite=overwrite,
            reuse=not reindex,
            pool=workers_pool,
        )
        plan = make_plan(index, config, pseudonymize)
        check_plan(out_path, plan, overwrite)
        source, paths = read_private_paths(private)
        if source != src_path:
            raise ShardError(
                "the private path table belongs to another source folder; give the same SRC as when the index was "
                "made, or rerun with --reindex"
            )

        units = select_part(plan.units, part)
        clean_temp(out_path, None if part is None else [u.name for u in units])
        todo = [u for u in units if not is_done(out_path, u.name, plan.fingerprint)]
        rows = {row["file"]: row for row in index.rows}
        tasks = [UnitTask(u.name, u.split, [(f, paths[f], rows[f]) for f in u.files]) for u in todo]
        buckets = list(config.index.age_buckets)
        settings = WriterSettings(
            src=str(src_path),
            out=str(out_path),
            size=config.size,
            fingerprint=plan.fingerprint,
            age_buckets=buckets,
            frame_rule=config.frames,
            vocab=vocabulary(buckets),
            codec=config.codec,
            exact_decode=config.exact_decode,
            text=ocr.screen_for(config.scan_text, config.text_rules, private),
            decoder=run_decoder,
        )
        if todo:
            log.info(
                "writing %d of %d units (%d files) with %d worker(s)",
                len(todo),
                len(units),
                sum(len(t.files) for t in tasks),
                workers,
            )
        for _ in pool.write_units(tasks, settings, workers=workers, progress=progress, pool=workers_pool):
            pass
    complete = all(is_done(out_path, u.name, plan.fingerprint) for u in plan.units)
    manifest = write_manifest(out_path, plan, config) if complete else None
    return ShardSummary(
        out=out_path,
        private_dir=private,
        complete=complete,
        units_total=len(plan.units),
        units_written=len(todo),
        units_skipped=len(units) - len(todo),
        manifest=manifest,
        seconds=time.perf_counter() - started,
        files_processed=sum(len(t.files) for t in tasks),
    )


def check_plan(out: Path, plan: Plan, overwrite: bool) -> None:
    """Refuse shards of another plan in OUT (or remove them with `overwrite`), then record this plan."""
    old = read_plan(out)
    if old is not None and old.get("fingerprint") != plan.fingerprint:
        if not overwrite:
            changes = files.changed_settings(old.get("config", {}), plan.config, keep=("csv_columns",))
            raise ShardError(
                "the output folder holds shards of a different plan ("
                + ("; ".join(changes) or "the source files or the key changed")
                + "); rerun with --overwrite to replace them, or choose another output folder"
            )
        removed = remove_outputs(out)
        log.info("--overwrite: removed %d files of the previous plan", removed)
    if old is None or old.get("fingerprint") != plan.fingerprint:
        files.write_text(out / PLAN_FILE, json.dumps(plan.to_json(), separators=(",", ":")) + "\n")


def remove_outputs(out: Path) -> int:
    """Delete shards, stats, temp files, plan and manifest (not the index: --reindex decides that)."""
    removed = 0
    for path in out.iterdir():
        name = path.name
        if files.is_temp(path) or name.endswith((TAR_SUFFIX, STATS_SUFFIX)) or name in (PLAN_FILE, MANIFEST, ERRORS):
            path.unlink()
            removed += 1
    return removed
