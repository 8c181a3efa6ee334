"""Pixel codecs: lossless both ways on real and synthetic 16-bit images; a blosc2 shard run reads back the same."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from radpretrain import synth
from radpretrain.shards import codecs, reader
from radpretrain.shards.dicom import resize_longest
from radpretrain.shards.format import ShardSet
from radpretrain.shards.plan import ShardConfig
from radpretrain.shards.run import shard
from radpretrain.shards.sample import stored_pixels


def images() -> list[np.ndarray]:
    """Real 16-bit radiographs (pydicom's RG1 and RG3 at 512 px), the extremes, a tiny and an odd-sized image."""
    real = []
    for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm"):
        path = get_testdata_file(name)
        assert path is not None, "pydicom-data is not installed"
        real.append(stored_pixels(resize_longest(pydicom.dcmread(path).pixel_array, 512))[0])
    rng = np.random.default_rng(0)
    return [
        *real,
        rng.integers(0, 65536, (37, 53), dtype=np.uint16),
        np.zeros((8, 8), np.uint16),
        np.full((9, 13), 65535, np.uint16),
        np.arange(300, dtype=np.uint16).reshape(1, 300),
    ]


@pytest.mark.parametrize("name", sorted(codecs.CODECS))
def test_every_codec_is_lossless(name: str) -> None:
    codec = codecs.CODECS[name]
    for image in images():
        data = codec.encode(image)
        back = codecs.decode_member({"__key__": "k", codec.ext: data})
        assert back.dtype == np.uint16 and back.shape == image.shape
        assert np.array_equal(back, image)


@pytest.mark.parametrize("name", sorted(codecs.CODECS))
def test_a_damaged_member_is_a_value_error(name: str) -> None:
    codec = codecs.CODECS[name]
    data = codec.encode(images()[0])
    for broken in (b"", data[: len(data) // 2], b"\x00" * 64 + data[64:]):
        with pytest.raises(ValueError):
            codecs.decode_member({codec.ext: broken})
    with pytest.raises(ValueError, match="lacks an image member"):
        codecs.decode_member({"json": b"{}"})


def test_blosc2_shards_read_back_the_pixels_of_png_shards(tmp_path: Path) -> None:
    synth.generate(tmp_path / "src", 12, seed=5, min_size=60, max_size=200, progress=False)
    out = {}
    for codec in ("png", "blosc2"):
        config = ShardConfig(size=96, shard_size=5, val_fraction=0.0, test_fraction=0.0, codec=codec)
        summary = shard(tmp_path / "src", tmp_path / codec, config, key=tmp_path / "k", progress=False)
        assert summary.manifest is not None and summary.manifest["codec"] == codec
        urls = ShardSet.open(tmp_path / codec).urls("train")
        for url in urls:
            with tarfile.open(url) as tar:
                assert {n.rsplit(".", 1)[1] for n in tar.getnames()} == {"json", codecs.CODECS[codec].ext}
        out[codec] = {s["key"]: s for s in reader.build_pipeline(urls, shuffle=0)}
    assert sorted(out["png"]) == sorted(out["blosc2"]) and len(out["png"]) == 12
    for key, sample in out["png"].items():
        assert np.array_equal(sample["pixels"], out["blosc2"][key]["pixels"])
        assert sample["meta"] == out["blosc2"][key]["meta"]
    # Forked loader workers decode after the parent has (Blosc2 keeps C state): every sample arrives once.
    from torch.utils.data import DataLoader

    pipeline = reader.build_pipeline(ShardSet.open(tmp_path / "blosc2").urls("train"), shuffle=0)
    keys = [sample["key"] for sample in DataLoader(pipeline, batch_size=None, num_workers=2, timeout=60)]
    assert sorted(keys) == sorted(out["blosc2"])
