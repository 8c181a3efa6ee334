"""The shard reader: manifest checks, node and worker splits, epochs, resampling, and bad tars."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from radpretrain.errors import ConfigError, ShardError
from radpretrain.shards import reader
from radpretrain.shards.format import ShardSet
from radpretrain.shards.plan import ShardConfig
from radpretrain.shards.run import shard
from tests.shards.helpers import make_archive

N = 24


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reader")
    make_archive(root / "src", N, patients=12)
    config = ShardConfig(size=48, shard_size=3, val_fraction=0.0, test_fraction=0.0)
    shard(root / "src", root / "out", config, key=root / "deid.key", progress=False)
    return root / "out"


def _keys(pipeline: Any) -> list[str]:
    return [sample["key"] for sample in pipeline]


def test_reads_every_sample_once_windowed(shards: Path) -> None:
    urls = ShardSet.open(shards).urls("train")
    assert len(urls) == N // 3 and all(Path(u).is_absolute() for u in urls)
    samples = list(reader.build_pipeline(urls, shuffle=8, seed=1))
    assert len({s["key"] for s in samples}) == len(samples) == N
    for sample in samples:
        assert sample["pixels"].dtype == np.uint16 and max(sample["pixels"].shape) == 48
        assert sample["image"].dtype == np.float32 and 0.0 <= sample["image"].min() <= sample["image"].max() <= 1.0
        assert sample["meta"]["split"] == "train"
    again = _keys(reader.build_pipeline(urls, shuffle=8, seed=1))
    assert again == [s["key"] for s in samples], "the same seed must give the same order"
    assert _keys(reader.build_pipeline(urls, shuffle=8, seed=2)) != again


def test_split_by_node(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    urls = ShardSet.open(shards).urls("train")
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(set(_keys(reader.build_pipeline(urls, shuffle=0))))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == N


def test_split_by_dataloader_worker(shards: Path) -> None:
    urls = ShardSet.open(shards).urls("train")
    pipeline = reader.build_pipeline(urls, shuffle=4, map_fn=_key_of)
    keys = list(torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2))
    assert len(keys) == len(set(keys)) == N


def _key_of(sample: dict[str, Any]) -> str:
    return str(sample["key"])


def test_epoch_length_repeats_and_resampling(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    urls = ShardSet.open(shards).urls("train")[:1]  # one shard of 3 samples
    assert len(_keys(reader.build_pipeline(urls, shuffle=0, epoch_len=7))) == 7
    assert len(_keys(reader.build_pipeline(urls, shuffle=0, epoch_len=7, resampled=True))) == 7
    # Two nodes on one shard split its samples: each fills its epoch from its own share, and one pass
    # reads every sample once.
    whole = _keys(reader.build_pipeline(urls, shuffle=0))
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        shares.append(_keys(reader.build_pipeline(urls, shuffle=0)))
        assert set(_keys(reader.build_pipeline(urls, shuffle=0, epoch_len=5))) == set(shares[-1])
    assert shares == [whole[0::2], whole[1::2]]


def test_truncated_shard_is_skipped_and_counted(shards: Path, tmp_path: Path) -> None:
    urls = ShardSet.open(shards).urls("train")[:2]
    data = Path(urls[0]).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    pipeline = reader.build_pipeline([str(cut), urls[1]], shuffle=0)
    keys = _keys(pipeline)
    assert 3 <= len(keys) < 6
    assert pipeline.record_errors.total >= 1


def test_nothing_readable_is_a_clear_error(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.tar"
    with tarfile.open(foreign, "w") as tar:
        info = tarfile.TarInfo("notes.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file at all" * 40)
    for urls in ([str(foreign)], [str(garbage)], [str(foreign), str(garbage)]):
        with pytest.raises(ShardError, match="no sample could be read"):
            list(reader.build_pipeline(urls, shuffle=0))
        with pytest.raises(ShardError, match="no sample could be read"):
            list(reader.build_pipeline(urls, shuffle=0, epoch_len=10, resampled=True))
        with pytest.raises(ShardError, match="no sample could be read"):
            list(reader.build_pipeline(urls, shuffle=0, epoch_len=10))


def test_manifest_errors(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"no manifest\.json"):
        ShardSet.open(tmp_path)
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(ShardError, match="has not finished"):
        ShardSet.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ShardError, match="not valid JSON"):
        ShardSet.open(tmp_path)
    manifest = json.loads((shards / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "intensity_convention": "raw-hu"}))
    with pytest.raises(ConfigError, match="intensity convention"):
        ShardSet.open(tmp_path)
    with pytest.raises(ShardError, match="unknown split"):
        ShardSet.open(shards).urls("training")
    with pytest.raises(ShardError, match="has no samples"):
        ShardSet.open(shards).urls("val")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="is missing"):
        ShardSet.open(tmp_path).urls("train")


def test_decode_rejects_broken_members() -> None:
    with pytest.raises(ValueError):
        reader.decode_sample({"__key__": "k", "json": b"{}"})
    with pytest.raises(ValueError):
        reader.decode_sample({"__key__": "k", "json": b"{}", "png": b"not a png"})


def test_piped_and_gzipped_shards_read_like_the_local_files(shards: Path, tmp_path: Path) -> None:
    """Local tars are read by random access; a url that cannot seek (pipe:) streams, and a local .tar.gz is
    read through its decompressor: both give the same samples."""
    urls = ShardSet.open(shards).urls("train")
    local = list(reader.build_pipeline(urls, shuffle=0))
    zipped = []
    for url in urls:
        zipped.append(str(tmp_path / (Path(url).name + ".gz")))
        Path(zipped[-1]).write_bytes(gzip.compress(Path(url).read_bytes()))
    for other in ([f"pipe:cat '{url}'" for url in urls], zipped):
        read = list(reader.build_pipeline(other, shuffle=0))
        assert [s["key"] for s in read] == [s["key"] for s in local] and len(local) == N
        for a, b in zip(local, read, strict=True):
            assert np.array_equal(a["pixels"], b["pixels"]) and a["meta"] == b["meta"]


@pytest.mark.parametrize("world, workers", [(1, 1), (1, 3), (2, 1), (2, 2), (3, 2), (4, 4)])
def test_reader_shares_cover_every_sample_once(world: int, workers: int) -> None:
    for shards in range(1, 2 * world * workers + 2):
        urls = [f"s{i}.tar" for i in range(shards)]
        sizes = {url: 3 + i % 5 for i, url in enumerate(urls)}  # samples per shard, uneven
        taken: list[tuple[str, int]] = []
        for rank in range(world):
            for worker in range(workers):
                share = reader.reader_share(urls, rank, world, worker, workers)
                assert share, (shards, rank, worker)  # every reader has something to read
                taken += [(url, i) for url, index, count in share for i in range(sizes[url]) if i % count == index]
                if shards >= world * workers:  # enough shards: whole ones, dealt as before
                    assert share == [(url, 0, 1) for url in urls[rank::world][worker::workers]]
        assert sorted(taken) == sorted((url, i) for url in urls for i in range(sizes[url])), (shards, world, workers)


class CountingFile(io.FileIO):
    """A local file that counts the bytes read from it."""

    read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.read_bytes += len(data)
        return data


def _big_member_tar(path: Path, samples: int, member: int) -> None:
    """A tar of `samples` samples: a `member`-byte png and a json each, and a third member in sample 2."""
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            extra = ("txt",) if i == 2 else ()
            for ext in ("json", "png", *extra):
                data = b"{}" if ext == "json" else bytes([i]) * member
                info = tarfile.TarInfo(f"key{i:02d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_part_skips_the_other_samples_without_reading_them(tmp_path: Path) -> None:
    path, member = tmp_path / "big.tar", 64 * 1024
    _big_member_tar(path, 9, member)
    passed: list[int] = []
    with CountingFile(path) as stream:
        names = [name for name, _ in reader.tar_members(stream, (1, 4), lambda: passed.append(1))]
        read = stream.read_bytes
    # samples 1 and 5 by key (sample 2's third member does not shift the count), none of the others' bytes
    assert names == ["key01.json", "key01.png", "key05.json", "key05.png"]
    assert len(passed) == 7
    assert 2 * member <= read < 2 * member + 32 * 1024 < path.stat().st_size // 4
    with CountingFile(path) as stream:
        whole = [name for name, _ in reader.tar_members(stream)]
    assert len(whole) == 19  # without a part: every member, as before
    # grouped into samples, from the local file and from a stream (a pipe reads and drops the others)
    for url in (str(path), f"pipe:cat '{path}'"):
        samples = reader.tar_samples([{"url": url, "part": (1, 4)}], _reraise)
        assert [s["__key__"] for s in samples] == ["key01", "key05"]


def _reraise(exc: Exception) -> bool:
    raise exc


def test_a_reader_with_an_empty_share(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    urls = ShardSet.open(shards).urls("train")[:1]  # one shard of 3 samples, 4 readers
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert _keys(reader.build_pipeline(urls, shuffle=0)) == []  # one pass: nothing left for it, quietly
    with pytest.raises(ShardError, match="fewer samples than there are readers"):
        list(reader.build_pipeline(urls, shuffle=0, epoch_len=5))  # an endless stream cannot fill its epochs


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("zipped", [False, True])
def test_parts_read_what_tarfile_reads(tmp_path: Path, fmt: int, zipped: bool) -> None:
    """Headers the quick parser of parts does not know (long names, directories, pax) go to tarfile: the parts
    together hold exactly the members of the whole shard, in order, whatever the tar format or compression."""
    path = tmp_path / ("mixed.tar.gz" if zipped else "mixed.tar")
    with tarfile.open(path, "w:gz" if zipped else "w", format=fmt) as tar:
        for i in range(7):
            if i == 5:  # after the long name, so the quick parser meets the ustar prefix itself
                folder = tarfile.TarInfo("folder")
                folder.type = tarfile.DIRTYPE
                tar.addfile(folder)
            # over 100 characters: a ustar prefix, a GNU long-name header or a pax header
            key = f"{'folder' * 10}/{'long' * 20 if i == 4 else 'key'}{i}"
            for ext in ("json", "png"):
                data = f"{key}.{ext}".encode() * (i + 1)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as stream:
        whole = list(reader.tar_members(stream))
    assert len(whole) == 14
    for count in (2, 3):
        parts = []
        for index in range(count):
            with open(path, "rb") as stream:
                parts.append(list(reader.tar_members(stream, (index, count))))
        assert sorted(m for p in parts for m in p) == sorted(whole)
        assert parts[0][:2] == whole[:2] and parts[1][:2] == whole[2:4]  # sample 0 to part 0, sample 1 to part 1
