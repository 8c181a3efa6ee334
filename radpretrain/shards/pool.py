"""The worker processes of a shard run, shared by the index pass and the write pass.

One pool serves both passes, so the workers are spawned (and import numpy, OpenCV and pydicom) once per run
instead of once per pass: on 2 cores that is about 0.5 s of a 1,000-file run's 10 s. Each worker dies with
its parent, reuses freed pixel buffers (`reuse_large_buffers`), runs OpenCV on one thread (parallelism comes
from the processes) and reports progress counts on a queue the parent drains.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import queue
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from radpretrain.errors import ShardError
from radpretrain.shards.sample import WriterSettings
from radpretrain.shards.writer import FileOutcome, UnitSink, UnitTask, process_files, write_unit

#: glibc malloc settings for processes that decode pixels (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD). By
#: default a freed 10 MB pixel buffer goes back to the kernel and the next file's buffers are page-faulted in
#: afresh: 2,400 faults and ~5 ms of a 2500 x 2000 file's 10 ms read. Buffers up to 128 MB now come from
#: the heap, which keeps up to 256 MB of free space for the next file (read_dicom: 3.6 ms instead of 9.6).
MALLOC_MMAP_THRESHOLD = 128 * 2**20
MALLOC_TRIM_THRESHOLD = 256 * 2**20

# Set in each worker by `_init_process`.
_PROCESS: dict[str, Any] = {}


def reuse_large_buffers() -> None:
    """Let this process reuse freed pixel-sized buffers instead of returning them (see MALLOC_*); glibc only."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MALLOC_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, MALLOC_TRIM_THRESHOLD)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its default behaviour, only slower
        pass


def setup_process() -> None:
    """What every process that decodes pixels needs, the parent included when it works alone."""
    import cv2

    from radpretrain.shards import deid

    reuse_large_buffers()
    cv2.setNumThreads(1)
    deid.quiet_header_echo()


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the parent dies, so a killed run leaves no workers behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: orphans finish their task and exit
        pass


def _init_process(updates: Any) -> None:
    _die_with_parent()
    setup_process()
    _PROCESS["updates"] = updates


def report(count: int) -> None:
    """Count `count` files done on the pool's progress queue (call inside a worker)."""
    _PROCESS["updates"].put(count)


class WorkerPool:
    """`workers` spawned processes (started on first use) and the queue their progress counts arrive on."""

    def __init__(self, workers: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.workers = workers
        self.updates = context.Queue()
        self.executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_init_process, initargs=(self.updates,)
        )

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def drain(self, update: Callable[[int], Any]) -> None:
        """Pass the progress counts queued so far to `update` (e.g. a tqdm bar's update)."""
        count = 0
        while True:
            try:
                count += self.updates.get_nowait()
            except queue.Empty:
                break
        if count:
            update(count)


#: Files per work item of the write pass. Units are split into chunks so that every worker stays busy while
#: files remain (a whole unit per worker left one worker decoding the last 1,000-file shard alone); a chunk is
#: small enough that the last ones end together, large enough that scheduling costs nothing (a 2500 x 2000
#: file takes 10-250 ms).
CHUNK_FILES = 8

#: Chunks handed out but not yet appended to their tar, per worker: enough to keep each worker fed while the
#: parent writes, few enough that memory stays flat (each chunk holds its encoded samples, ~2 MB at 512 px).
CHUNKS_AHEAD = 3


@dataclass
class _Chunk:
    unit: int  # index into the task list
    number: int  # position within the unit
    files: list[tuple[str, str, dict[str, Any]]]


def _chunks(tasks: list[UnitTask], size: int) -> Iterator[_Chunk]:
    for unit, task in enumerate(tasks):
        for number, start in enumerate(range(0, max(len(task.files), 1), size)):  # an empty unit: one empty chunk
            yield _Chunk(unit, number, task.files[start : start + size])


def write_units(
    tasks: list[UnitTask],
    settings: WriterSettings,
    workers: int = 1,
    progress: bool = True,
    pool: WorkerPool | None = None,
) -> Iterator[dict[str, Any]]:
    """Write units with `workers` processes (1: in this process); yields each unit's stats as it finishes.

    With several workers, files are handed out in chunks of `CHUNK_FILES` in plan order; this process appends
    each chunk's samples to its unit's tar in plan order (a unit's tar is the same bytes whatever the worker
    count) and closes a unit as soon as its last chunk is in. `pool` (shared with the index pass) is used when
    given; otherwise one is started here.
    """
    from tqdm import tqdm

    total = sum(len(t.files) for t in tasks)
    bar = tqdm(total=total, unit="files", desc="shard", disable=not progress, smoothing=0.05)
    try:
        if workers <= 1 or total <= 1:
            setup_process()
            for task in tasks:
                yield write_unit(task, settings, progress=bar.update)
            return
        with contextlib.ExitStack() as stack:
            if pool is None:
                pool = stack.enter_context(WorkerPool(workers))
            yield from _write_chunked(tasks, settings, pool, bar.update)
    finally:
        bar.close()


def _write_chunked(
    tasks: list[UnitTask], settings: WriterSettings, pool: WorkerPool, update: Callable[[int], Any]
) -> Iterator[dict[str, Any]]:
    todo = _chunks(tasks, CHUNK_FILES)
    sinks: dict[int, UnitSink] = {}  # units with a tar open, by task index
    waiting: dict[tuple[int, int], list[FileOutcome]] = {}  # finished chunks not yet appended (out of order)
    next_chunk: dict[int, int] = {}  # per open unit: the chunk to append next
    pending: dict[concurrent.futures.Future[list[FileOutcome]], _Chunk] = {}
    limit = CHUNKS_AHEAD * pool.workers
    try:
        while True:
            while len(pending) + len(waiting) < limit:
                chunk = next(todo, None)
                if chunk is None:
                    break
                if chunk.unit not in sinks:
                    sinks[chunk.unit] = UnitSink(tasks[chunk.unit], settings)
                    next_chunk[chunk.unit] = 0
                task = tasks[chunk.unit]
                future = pool.executor.submit(process_files, chunk.files, task.split, settings)
                pending[future] = chunk
            if not pending:
                break
            done, _ = concurrent.futures.wait(pending, return_when="FIRST_COMPLETED")
            for future in done:
                chunk = pending.pop(future)
                try:
                    waiting[(chunk.unit, chunk.number)] = future.result()
                except concurrent.futures.process.BrokenProcessPool:
                    raise ShardError(
                        "a worker process died (out of memory, or a decoder crashed); finished units are "
                        "kept: run the same command again (with fewer --workers if memory is short)"
                    ) from None
            # Append whatever is next in plan order, unit by unit; close the units that are complete.
            for unit in list(sinks):
                while (unit, next_chunk[unit]) in waiting:
                    outcomes = waiting.pop((unit, next_chunk[unit]))
                    for outcome in outcomes:
                        sinks[unit].add(outcome)
                    next_chunk[unit] += 1
                    update(len(outcomes))
                if sinks[unit].complete:
                    yield sinks.pop(unit).close()
    finally:
        for future in pending:
            future.cancel()
        for sink in sinks.values():  # units in flight when the run stops: their temp tars go, nothing else
            sink.abort()
