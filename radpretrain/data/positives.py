"""Same-patient and same-study positives (MICLe): where each train image lies in the shards, and its partner draw."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import typing
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from radpretrain import files
from radpretrain.errors import ConfigError, ShardError
from radpretrain.registry import did_you_mean
from radpretrain.shards.format import STRONG_VIEWS

log = logging.getLogger(__name__)

#: `data.positives`: where the second strong view comes from. "augment": another augmentation of the same
#: image (SimCLR and the rest as published); "same_study" / "same_patient": another image of the same study /
#: patient where there is one (MICLe, Azizi et al. 2021, https://arxiv.org/abs/2101.05224), else the same image.
Positives = Literal["augment", "same_study", "same_patient"]
MODES: tuple[str, ...] = typing.get_args(Positives)
#: The sample json field that groups images in each pairing mode.
GROUP_FIELD = {"same_study": "study", "same_patient": "patient"}
#: The member index of a run's train shards, cached in the run folder (keyed by the shards' sizes and times).
INDEX_FILE = "positives-index.npz"
#: Bump when the cached arrays change meaning: an older cache is then rebuilt, never misread.
INDEX_VERSION = 1


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(
            f"data.positives must be one of {', '.join(MODES)}, got {mode!r}.{did_you_mean(str(mode), MODES)}"
        )


def check_views(mode: str, views: Sequence[str], tasks: Iterable[str]) -> None:
    """Refuse a pairing mode that no task of the run would see: only the two strong views are ever paired."""
    check_mode(mode)
    if mode == "augment" or set(STRONG_VIEWS) <= set(views):
        return
    from radpretrain.pretrain.tasks import TASKS

    two_view = [name for name in TASKS.names() if set(STRONG_VIEWS) <= set(TASKS.get(name).views)]
    raise ConfigError(
        f"data.positives={mode} pairs two images as the two strong views, but no task of this run "
        f"({', '.join(tasks)}) uses two views; add a two-view task ({', '.join(two_view)}) or set "
        "data.positives=augment"
    )


def local_paths(urls: Sequence[str]) -> list[str]:
    """The shard urls as local files; ConfigError for a pipe or a remote url, which cannot be read by offset."""
    for url in urls:
        if url.startswith("pipe:") or "://" in url or not os.path.isfile(url):
            raise ConfigError(
                f"data.positives reads partner images by offset from local tar files, and {url[:80]!r} is not one; "
                "copy the shards to a local or mounted folder, or set data.positives=augment"
            )
    return list(urls)


@dataclass(frozen=True)
class MemberIndex:
    """One row per sample of the train shards: its key, where its json and image members lie, and its groups.

    `keys` is sorted (rows are found by binary search); `patient` and `study` are group codes, -1 where the
    sample's json has no value. Numpy arrays only, so forked loader workers share the pages: about 85 bytes a
    sample (43 MB for 500,000), and 24 more for a pairing mode's groups (`Partners`).
    """

    urls: tuple[str, ...]
    keys: np.ndarray  # bytes ("S"), sorted
    shard: np.ndarray  # int32 index into urls
    json_at: np.ndarray  # int64 (n, 2): offset, size
    image_at: np.ndarray  # int64 (n, 2): offset, size
    image_ext: np.ndarray  # int8 index into codecs.IMAGE_EXTS
    patient: np.ndarray  # int64 group code or -1
    study: np.ndarray  # int64 group code or -1

    ARRAYS: ClassVar[tuple[str, ...]] = ("keys", "shard", "json_at", "image_at", "image_ext", "patient", "study")

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def build(cls, urls: Sequence[str]) -> MemberIndex:
        """Scan the tars' headers and json members (no image is read or decoded)."""
        keys: list[bytes] = []
        rows: list[tuple[int, int, int, int, int, int]] = []
        groups: dict[str, list[str | None]] = {"patient": [], "study": []}
        for number, url in enumerate(urls):
            for key, json_at, image_at, ext, meta in scan_shard(url):
                keys.append(key.encode())
                rows.append((number, *json_at, *image_at, ext))
                for field in groups:
                    value = meta.get(field)
                    groups[field].append(value if isinstance(value, str) and value else None)
        table = np.asarray(rows, dtype=np.int64).reshape(-1, 6)
        key_array = np.asarray(keys, dtype=bytes)
        order = np.argsort(key_array, kind="stable")
        codes = {field: group_codes(values)[order] for field, values in groups.items()}
        table = table[order]
        return cls(
            urls=tuple(urls),
            keys=key_array[order],
            shard=table[:, 0].astype(np.int32),
            json_at=table[:, 1:3].copy(),
            image_at=table[:, 3:5].copy(),
            image_ext=table[:, 5].astype(np.int8),
            patient=codes["patient"],
            study=codes["study"],
        )

    @classmethod
    def open(cls, urls: Sequence[str], cache: Path | None = None) -> MemberIndex:
        """The index of `urls`: from `cache` when it was made from these very files, else scanned (and cached)."""
        urls = local_paths(urls)
        stamp = shard_stamp(urls)
        if cache is not None and cache.is_file():
            try:
                with np.load(cache, allow_pickle=False) as saved:
                    if str(saved["stamp"]) == stamp:
                        return cls(urls=tuple(urls), **{name: saved[name] for name in cls.ARRAYS})
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # damaged: rebuilt
                log.warning("positives: rebuilding the member index (%s: %s)", cache.name, type(exc).__name__)
        index = cls.build(urls)
        if cache is not None:
            buffer = io.BytesIO()
            np.savez(buffer, stamp=np.asarray(stamp), **{name: getattr(index, name) for name in cls.ARRAYS})
            files.write_bytes(cache, buffer.getvalue())
        return index

    def row(self, key: str) -> int | None:
        """The row of a sample key, or None for a key the index does not hold."""
        wanted = key.encode()
        at = int(np.searchsorted(self.keys, wanted))
        return at if at < len(self.keys) and self.keys[at] == wanted else None

    def read(self, row: int) -> dict[str, Any]:
        """The sample of `row` decoded as the reader decodes it: {"key", "pixels" (uint16 HxW), "meta"}.

        ValueError (or OSError) when its bytes are not what the index says: the shard changed or broke.
        """
        from radpretrain.shards import codecs
        from radpretrain.shards.reader import decode_sample

        key = self.keys[row].decode()
        ext = codecs.IMAGE_EXTS[int(self.image_ext[row])]
        fd = os.open(self.urls[int(self.shard[row])], os.O_RDONLY)
        try:  # pread: no file position, so forked workers never move each other's reads
            raw = {"__key__": key, "json": pread(fd, *self.json_at[row]), ext: pread(fd, *self.image_at[row])}
        finally:
            os.close(fd)
        return decode_sample(raw)


def pread(fd: int, offset: int, size: int) -> bytes:
    data = os.pread(fd, int(size), int(offset))
    if len(data) != size:
        raise ValueError(f"the shard ends {size - len(data)} bytes before the member its index names (it changed)")
    return data


def group_codes(values: Sequence[str | None]) -> np.ndarray:
    """Each value as an int64 code (equal values, equal codes), -1 for None."""
    named = [value for value in values if value is not None]
    lookup = {value: code for code, value in enumerate(sorted(set(named)))}
    return np.asarray([-1 if value is None else lookup[value] for value in values], dtype=np.int64)


def shard_stamp(urls: Sequence[str]) -> str:
    """What identifies the shards' contents cheaply: each path with its size and modification time."""
    entries = []
    for url in urls:
        info = os.stat(url)
        entries.append([url, info.st_size, info.st_mtime_ns])
    return json.dumps({"version": INDEX_VERSION, "shards": entries})


def scan_shard(url: str) -> list[tuple[str, tuple[int, int], tuple[int, int], int, dict[str, Any]]]:
    """(key, json (offset, size), image (offset, size), image ext index, json) of each sample of a plain tar.

    Reads the tar headers (the reader's own ustar parser) and the json members; no image is read. A sample
    without an image or a readable json is left out, as the reader drops it.
    """
    from webdataset.tariterators import base_plus_ext

    from radpretrain.shards import codecs
    from radpretrain.shards.reader import _plain_members

    with open(url, "rb") as stream:
        try:
            members = list(_plain_members(stream))
        except (OSError, ValueError, tarfile.TarError) as exc:
            raise ShardError(
                f"{Path(url).name} is not a plain tar ({type(exc).__name__}); data.positives reads uncompressed "
                "radpretrain shards: re-shard it, or set data.positives=augment"
            ) from None
        samples: dict[str, dict[str, tuple[int, int]]] = {}
        for member in members:
            prefix, ext = base_plus_ext(member.name)
            if prefix is not None:  # the reader's group_by_keys drops a member without an extension
                samples.setdefault(prefix, {})[ext] = (member.offset_data, member.size)
        out = []
        for key, parts in samples.items():
            image = [i for i, ext in enumerate(codecs.IMAGE_EXTS) if ext in parts]  # as decode_member: the first
            if "json" not in parts or not image:
                continue
            stream.seek(parts["json"][0])
            try:
                meta = json.loads(stream.read(parts["json"][1]))
            except ValueError:
                continue
            if isinstance(meta, dict):
                out.append((key, parts["json"], parts[codecs.IMAGE_EXTS[image[0]]], image[0], meta))
    return out


class Partners:
    """For a pairing mode: which other train image a sample's second view comes from, and that image.

    A sample whose group (patient or study) holds other train images gets one of them, drawn uniformly
    from the `rng` given (the sample function's seeded stream); a sample alone in its group, without a
    group value, or not in the index gets None: both views then come from its own image.
    """

    def __init__(self, index: MemberIndex, mode: str) -> None:
        check_mode(mode)
        if mode not in GROUP_FIELD:
            raise ConfigError(f"data.positives={mode} draws no partner images; use same_study or same_patient")
        self.index, self.mode = index, mode
        codes = getattr(index, GROUP_FIELD[mode])
        n = len(codes)
        # Rows of one group sit side by side in `order`; a row's group is order[start : start + size].
        # A missing value (-1) makes a group of one: each gets a code of its own beyond the others.
        alone = codes < 0
        codes = codes.copy()
        codes[alone] = codes.max(initial=-1) + 1 + np.arange(int(alone.sum()))
        self.order = np.argsort(codes, kind="stable")
        sorted_codes = codes[self.order]
        first = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]) if n else np.zeros(0, np.int64)
        sizes = np.diff(np.r_[first, n])
        group = np.repeat(np.arange(len(first)), sizes)
        self.start = np.empty(n, dtype=np.int64)
        self.size = np.empty(n, dtype=np.int64)
        self.start[self.order] = first[group]
        self.size[self.order] = sizes[group]
        self.missing = int(alone.sum())

    @property
    def paired(self) -> int:
        """Train images with at least one other image in their group."""
        return int((self.size >= 2).sum())

    def describe(self) -> str:
        n = len(self.size)
        share = self.paired / n if n else 0.0
        line = f"{self.mode}: {share:.0%} of {n:,} train images have another image of their {GROUP_FIELD[self.mode]}"
        if self.missing:
            line += f" ({self.missing:,} have no {GROUP_FIELD[self.mode]} in their json)"
        return line

    def draw(self, key: str, rng: np.random.Generator) -> int | None:
        """The row of a partner for `key`: another image of its group, uniformly; None when it has none."""
        row = self.index.row(key)
        if row is None or self.size[row] < 2:
            return None
        start, size = int(self.start[row]), int(self.size[row])
        other = int(self.order[start + int(rng.integers(size - 1))])
        return other if other != row else int(self.order[start + size - 1])  # the last stands in for itself

    def read(self, row: int) -> dict[str, Any]:
        return self.index.read(row)


def open_partners(mode: str, urls: Sequence[str], cache: Path | None = None) -> Partners:
    """The partners of `urls`' samples for pairing mode `mode` (same_study or same_patient)."""
    check_mode(mode)
    return Partners(MemberIndex.open(urls, cache), mode)
