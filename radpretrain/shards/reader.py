"""Shard folder -> webdataset pipeline: split by node and worker, shuffle, decode, window; bad records counted."""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from radpretrain import intensity
from radpretrain.errors import ConfigError, ShardError
from radpretrain.shards import codecs

log = logging.getLogger(__name__)

#: Why a record without an image (png or b2nd) and a json member is dropped.
FOREIGN = "not a radpretrain sample"

#: The longest Unix socket path (sun_path less its closing NUL): 108 bytes on Linux, 104 on macOS and the BSDs.
SOCKET_PATH_MAX = (108 if sys.platform.startswith("linux") else 104) - 1
#: What multiprocessing adds to its base folder for a socket: `/pymp-XXXXXXXX` once, `/listener-XXXXXXXX` each.
_PYMP, _LISTENER = len("/pymp-12345678"), len("/listener-12345678")


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A raw webdataset sample -> {"key", "pixels" (uint16 HxW), "meta"}; ValueError on a broken one."""
    if "json" not in sample:
        raise ValueError("sample lacks a json member")
    return {"key": sample["__key__"], "pixels": codecs.decode_member(sample), "meta": json.loads(sample["json"])}


def window_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode (if needed) and add "image": float32 HxW in [0, 1] through the stored window."""
    if "pixels" not in sample:
        sample = decode_sample(sample)
    meta = sample["meta"]
    return {**sample, "image": intensity.apply_window(sample["pixels"], meta["window_center"], meta["window_width"])}


class RecordErrors:
    """The skip-and-count policy for bad records; `counts` says what was dropped and why, `shards` from where."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.shards: Counter[str] = Counter()

    def __call__(self, exc: Exception) -> bool:
        self.record(type(exc).__name__, _shard_name(exc.args))
        return True  # continue with the next record

    def record(self, reason: str, shard: str | None) -> None:
        self.counts[reason] += 1
        if shard:
            self.shards[shard] += 1
        if self.total <= 3:
            log.warning("skipping a bad shard record%s (%s)", f" in {shard}" if shard else "", reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _shard_name(values: Iterable[Any]) -> str | None:
    """The file name of the shard an error came from: webdataset appends the url (or the open file) to its args."""
    for value in reversed(list(values)):
        match = re.search(r"([^/\\'\"\s]+\.tar)\b", str(value))
        if match:
            return match.group(1)  # the name only: the folder is the user's and says nothing useful here
    return None


def prepare_worker_sockets() -> None:
    """Give forked DataLoader workers a socket folder short enough to hand their batches to this process.

    A worker passes each batch's tensors as file descriptors over a Unix socket in multiprocessing's temp
    folder, made under TMPDIR on first use. Under a TMPDIR too long for a socket path, binding fails in the
    worker's queue thread, which prints the error and drops the batch: the main process then waits for it
    forever, and an error that another worker queued behind it never arrives. Call this before a DataLoader
    with workers starts; as Python 3.13's multiprocessing does, the folder then goes to /tmp instead.
    """
    import multiprocessing.util
    import tempfile

    base = tempfile.gettempdir()
    if len(base) + _PYMP + _LISTENER > SOCKET_PATH_MAX:
        short = next((d for d in ("/tmp", "/var/tmp", "/usr/tmp") if os.path.isdir(d) and os.access(d, os.W_OK)), base)
        saved, tempfile.tempdir = tempfile.tempdir, short
        try:
            folder = multiprocessing.util.get_temp_dir()  # made once per process, kept by forked workers
        finally:
            tempfile.tempdir = saved
    else:
        folder = multiprocessing.util.get_temp_dir()
    if len(folder) + _LISTENER > SOCKET_PATH_MAX:
        raise ConfigError(
            f"the temp folder {folder} is too long for the sockets that loader workers hand batches over "
            f"({len(folder) + _LISTENER} > {SOCKET_PATH_MAX} characters); set TMPDIR to a shorter folder or "
            "use data.workers=0"
        )


def _worker_info() -> tuple[int, int, int, int]:
    from webdataset.utils import pytorch_worker_info

    rank, world, worker, workers = pytorch_worker_info()
    return int(rank), int(world), int(worker), int(workers)


class ReadState:
    """What a reader has seen so far: well-formed records, the bad ones skipped (by exception type), and the
    samples of its shards that belong to other readers (`passed`, when readers split the samples of a shard)."""

    def __init__(self) -> None:
        self.good = 0
        self.passed = 0
        self.errors = RecordErrors()

    def count(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Count well-formed records; drop (and record) the members of a foreign tar here, before any buffer."""
        for sample in src:
            if "json" in sample and any(ext in sample for ext in codecs.IMAGE_EXTS):
                self.good += 1
                yield sample
            else:
                self.errors.record(FOREIGN, _shard_name([sample.get("__url__", "")]))

    def pass_by(self) -> None:
        """A sample of this reader's shards that another reader takes."""
        self.passed += 1

    def check(self, endless: bool = False) -> None:
        """After a full round of shards: nothing readable at all is an error, not an empty epoch.

        A reader whose share of a few small shards holds no sample while other readers' shares do ends its
        pass quietly; an endless stream cannot fill its epochs from such a share and says why.
        """
        if self.good:
            return
        if self.passed and not endless:
            return
        if self.passed:
            raise ShardError(
                f"this reader's share of the shards holds no sample ({self.passed} belong to other readers): the "
                "shards hold fewer samples than there are readers (processes x loader workers); use fewer loader "
                "workers or processes, or add data"
            )
        shown = ", ".join(f"{n} x {name}" for name, n in sorted(self.errors.counts.items())) or "no records"
        shards = sorted(self.errors.shards)
        where = ", ".join(shards[:5]) + (f" and {len(shards) - 5} more" if len(shards) > 5 else "")
        raise ShardError(
            f"no sample could be read from {where or 'the shards'} ({shown}); they are truncated, empty or not "
            "radpretrain shards: re-shard them or check the paths"
        )


#: One reader's share of a shard: (url, index, count) takes samples index, index + count, ... (by position).
Share = tuple[str, int, int]


def reader_share(urls: Sequence[str], rank: int, world: int, worker: int, workers: int) -> list[Share]:
    """The shards, or parts of shards, that worker `worker` of `workers` on node `rank` of `world` reads.

    With at least as many shards as readers (world x workers), whole shards: urls[rank::world][worker::workers]
    (each reader gets one or more). With fewer, each shard is cut into k = ceil(readers / shards) parts,
    part j taking its samples j, j + k, j + 2k, ... (a sample: the members sharing a key), and the parts are
    dealt out the same way, so every reader gets at least one part and every sample falls to one reader.
    The share depends on nothing but the shard list and the reader layout: the same in every epoch.
    """
    parts = parts_per_shard(len(urls), world * workers)
    if parts == 1:
        return [(url, 0, 1) for url in urls[rank::world][worker::workers]]
    dealt = [(url, index, parts) for index in range(parts) for url in urls]  # part-major: a node gets all parts
    return dealt[rank::world][worker::workers]


def parts_per_shard(shards: int, readers: int) -> int:
    """Into how many parts `reader_share` cuts each shard: 1 (whole shards) when the shards are as many as the
    readers or more, else ceil(readers / shards)."""
    return 1 if shards >= readers else -(-readers // shards)


def reader_layout(workers: int) -> tuple[int, int, int]:
    """(rank, world, readers) of this process for a DataLoader with `workers` workers (0: read in the process)."""
    rank, world, _, _ = _worker_info()
    return rank, world, world * max(1, workers)


class ShardSource:
    """This node and DataLoader worker's share of the shards: an exact split, or endless repeats / resampling.

    Without `resampled`, each reader (node x worker) reads its `reader_share` once, or round after round
    when `repeat` is set (training with an explicit epoch length): whole shards when there are at least as
    many shards as readers, else every k-th sample of a shard, so in one pass every sample is read by
    exactly one reader. With `resampled`, each reader draws whole shards at random, seeded by (seed, epoch,
    rank, worker). After one full round without a single readable record it raises ShardError instead of
    looping.
    """

    def __init__(self, urls: Sequence[str], state: ReadState, *, seed: int, resampled: bool, repeat: bool) -> None:
        if not urls:
            raise ShardError("no shard urls given; use ShardSet.open(root).urls(split) to list them")
        self.urls = list(urls)
        self.state = state
        self.seed = seed
        self.resampled = resampled
        self.repeat = repeat
        self.epoch = -1

    def __call__(self) -> Iterator[dict[str, Any]]:  # webdataset calls a first stage that is not a dataset
        return iter(self)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.epoch += 1
        rank, world, worker, workers = _worker_info()
        rng = random.Random(f"{self.seed}:{self.epoch}:{rank}:{worker}")
        if self.resampled:
            for drawn in itertools.count():
                if drawn == len(self.urls):
                    self.state.check()
                yield {"url": rng.choice(self.urls)}
        mine = [_source(*share) for share in reader_share(self.urls, rank, world, worker, workers)]
        while True:
            order = list(mine)
            rng.shuffle(order)
            yield from (dict(source) for source in order)  # a copy: the opener adds the stream to it
            self.state.check(endless=self.repeat)
            if not self.repeat:
                return


def _source(url: str, index: int, count: int) -> dict[str, Any]:
    """The opener's input for one share: a whole shard is {"url"} (as webdataset's), a part adds "part"."""
    return {"url": url} if count == 1 else {"url": url, "part": (index, count)}


class _Shuffle:
    """A shuffle buffer seeded per (seed, epoch, rank, worker), so runs are reproducible yet readers differ."""

    def __init__(self, bufsize: int, seed: int) -> None:
        self.bufsize = bufsize
        self.seed = seed
        self.epoch = -1

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        from webdataset.filters import _shuffle

        self.epoch += 1
        rank, _, worker, _ = _worker_info()
        rng = random.Random(f"{self.seed}:{self.epoch}:{rank}:{worker}:shuffle")
        yield from _shuffle(src, self.bufsize, min(self.bufsize, 100), rng)


def tar_members(
    stream: Any, part: tuple[int, int] | None = None, pass_by: Callable[[], None] | None = None
) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in an opened tar, by random access when the stream can seek.

    webdataset reads tars as streams ("r|*"): tarfile then copies every 8 KB read of a member through
    its record buffer, 0.30 ms for a 230 KB member against 0.04 ms by random access (tarfile parses the
    headers, each member is one read) on the same local file (measured on blosc2 shards, one core).
    Pipes and sockets still stream. With `part` = (index, count), only the members of samples index,
    index + count, ... come out (a sample: consecutive members sharing a key, as `group_by_keys` groups
    them); the others are passed by, each reported to `pass_by`, and their bytes are not read by random
    access (a stream reads and drops them).
    """
    seekable = getattr(stream, "seekable", None)  # webdataset's pipe: streams have none
    if not (seekable and seekable()):
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in _share_of(tar, part, pass_by):
                member = tar.extractfile(info) if info.isreg() else None
                if member is not None:
                    yield info.name, member.read()
        return
    if part is not None and not _compressed(stream):
        for info in _share_of(_plain_members(stream), part, pass_by):
            stream.seek(info.offset_data)
            data = stream.read(info.size)
            if len(data) != info.size:
                raise tarfile.ReadError(f"unexpected end of data in {info.name}")
            yield info.name, data
        return
    with tarfile.open(fileobj=stream, mode="r:*") as tar:  # tar.fileobj: the file, or its gzip/bz2/xz reader
        for info in _share_of(tar, part, pass_by):
            if info.isreg() and not info.sparse:
                tar.fileobj.seek(info.offset_data)
                data = tar.fileobj.read(info.size)
                if len(data) != info.size:
                    raise tarfile.ReadError(f"unexpected end of data in {info.name}")
                yield info.name, data


#: Magic numbers of the compressed tars tarfile's "r:*" opens: gzip, bzip2, xz.
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_BLOCK = tarfile.BLOCKSIZE


class _Member(NamedTuple):
    """A regular member found by `_plain_members`: what reading it takes."""

    name: str
    offset_data: int
    size: int

    def isreg(self) -> bool:
        return True


def _compressed(stream: Any) -> bool:
    start = stream.tell()
    head = stream.read(6)
    stream.seek(start)
    return head.startswith(_COMPRESSED)


def _plain_members(stream: Any) -> Iterator[_Member]:
    """The regular members of an uncompressed tar from their ustar headers alone, seeking past the data.

    A reader that takes one in k samples parses every header of its shard: tarfile's TarInfo costs about
    17 us a member (a tenth of decoding a blosc2 sample), this about 5 us. What this does not know (pax
    or GNU long-name headers, links, directories, sparse files, a bad checksum, the end) it hands to
    tarfile from that header on, so tarfile decides there as it does for whole shards.
    """
    offset = stream.tell()
    while True:
        stream.seek(offset)
        member = _ustar_member(stream.read(_BLOCK), offset)
        if member is None:
            stream.seek(offset)
            with tarfile.open(fileobj=stream, mode="r:") as tar:
                for info in tar:
                    if info.isreg() and not info.sparse:
                        yield _Member(info.name, info.offset_data, info.size)
            return
        yield member
        offset = member.offset_data + -(-member.size // _BLOCK) * _BLOCK


def _ustar_member(block: bytes, offset: int) -> _Member | None:
    """A plain regular file's header as tarfile reads it (tarfile.TarInfo.frombuf), or None for anything else."""
    if len(block) < _BLOCK or block[156:157] not in (b"0", b"\0", b"7") or block[124] & 0x80:
        return None
    try:
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        checksum = int(block[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(block) - sum(block[148:156]) + 256:  # the checksum field counts as 8 spaces
        return None
    name = block[:100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
    if block[257:265] == tarfile.POSIX_MAGIC and block[345]:
        name = block[345:500].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape") + "/" + name
    if name.endswith("/"):  # a directory, to tarfile
        return None
    return _Member(name, offset + _BLOCK, size)


def _share_of(infos: Iterable[Any], part: tuple[int, int] | None, pass_by: Callable[[], None] | None) -> Iterator[Any]:
    """The members of this reader's samples (all of them without `part`), headers only: no member is read here."""
    if part is None:
        yield from infos
        return
    from webdataset.tariterators import base_plus_ext

    index, count = part
    key, number = None, -1
    for info in infos:
        if not info.isreg():
            continue
        prefix, _ = base_plus_ext(info.name)
        if prefix is None:  # group_by_keys drops a member without an extension: it belongs to no sample
            continue
        if prefix != key:
            key, number = prefix, number + 1
            if number % count != index and pass_by is not None:
                pass_by()
        if number % count == index:
            yield info


def tar_files(
    sources: Iterable[dict[str, Any]],
    handler: Callable[[Exception], bool],
    pass_by: Callable[[], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """webdataset's tar_file_expander with `tar_members`: opened shards -> {"fname", "data", "__url__"}, then {}.

    The empty dict after each shard tells `group_by_keys` that a shard ended. A shard that fails part-way
    is handed to `handler` (with its url appended to the error) and the next shard follows. A source with
    a "part" (index, count) gives only that part's samples (see `tar_members`).
    """
    for source in sources:
        try:
            for name, data in tar_members(source["stream"], source.get("part"), pass_by):
                yield {"fname": name, "data": data, "__url__": source["url"]}
        except Exception as exc:
            exc.args = (*exc.args, source["url"])
            if not handler(exc):
                break
        finally:
            source["stream"].close()
        yield {}


def tar_samples(
    src: Iterable[dict[str, Any]], handler: Callable[[Exception], bool], pass_by: Callable[[], None] | None = None
) -> Iterator[dict[str, Any]]:
    """Shard urls (or parts: {"url", "part"}) -> webdataset samples ({"__key__", "__url__", ext: bytes}), as
    `wds.tarfile_samples`."""
    from webdataset.tariterators import group_by_keys, url_opener

    return group_by_keys(tar_files(url_opener(src, handler=handler), handler, pass_by), handler=handler)


def build_pipeline(
    urls: Sequence[str],
    *,
    shuffle: int = 1000,
    seed: int = 0,
    map_fn: Callable[[dict[str, Any]], Any] | None = None,
    epoch_len: int | None = None,
    resampled: bool = False,
) -> Any:
    """A webdataset pipeline over `urls` yielding map_fn(decoded sample) (default: `window_sample`).

    Use as `DataLoader(pipeline, batch_size=None or B, num_workers=...)`; do not pass it to
    `accelerator.prepare` (it splits itself by node and worker: whole shards, or samples of a shard when
    the shards are fewer than the readers; see `reader_share`). `epoch_len` is the number of samples
    each reader (node x worker) yields per epoch; with it, an exact (non-resampled) pipeline repeats its
    shards so every reader can fill an epoch. Bad records are skipped and counted in
    `pipeline.record_errors`.
    """
    import webdataset as wds

    if shuffle < 0:
        raise ValueError(f"shuffle must be >= 0, got {shuffle}")
    if epoch_len is not None and epoch_len < 1:
        raise ValueError(f"epoch_len must be >= 1, got {epoch_len}")
    state = ReadState()
    stages: list[Any] = [
        ShardSource(urls, state, seed=seed, resampled=resampled, repeat=epoch_len is not None),
        wds.pipelinefilter(tar_samples)(handler=state.errors, pass_by=state.pass_by),
        state.count,
    ]
    if shuffle > 1:
        stages.append(_Shuffle(shuffle, seed))
    stages.append(wds.map(decode_sample, handler=state.errors))
    stages.append(wds.map(map_fn or window_sample))
    pipeline = wds.DataPipeline(*stages)
    pipeline.record_errors = state.errors
    if epoch_len is not None:
        pipeline = pipeline.with_epoch(epoch_len)
    return pipeline
