"""Plain webdataset and `datasets` read shards' exact 16-bit pixels through `portable`; `.decode("pil")` does not."""

from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch
import webdataset as wds
from datasets.exceptions import DatasetGenerationError

from radpretrain import synth
from radpretrain.shards import codecs, portable, reader
from radpretrain.shards.format import SAMPLE_FIELDS, ShardSet
from radpretrain.shards.plan import ShardConfig
from radpretrain.shards.run import shard

CODEC_NAMES = sorted(codecs.CODECS)


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """One tiny synthetic archive sharded with each codec: codec name -> train tar urls."""
    root = tmp_path_factory.mktemp("portable")
    synth.generate(root / "src", 8, seed=3, min_size=60, max_size=160, progress=False)
    urls = {}
    for codec in CODEC_NAMES:
        config = ShardConfig(size=64, shard_size=4, val_fraction=0.0, test_fraction=0.0, codec=codec)
        shard(root / "src", root / codec, config, key=root / "key", progress=False)
        urls[codec] = ShardSet.open(root / codec).urls("train")
    return urls


@pytest.fixture(scope="module")
def stored(shard_sets: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """What radpretrain's own reader gives: codec -> key -> {"pixels", "meta"}."""
    out = {codec: {s["key"]: s for s in reader.build_pipeline(urls, shuffle=0)} for codec, urls in shard_sets.items()}
    assert all(len(samples) >= 8 for samples in out.values())
    # Values above 255 in every image: the test would not notice an 8-bit decode otherwise.
    assert all(s["pixels"].max() > 255 for samples in out.values() for s in samples.values())
    return out


def assert_exact(got: dict[str, Any], want: dict[str, Any], dtype: Any = np.uint16) -> None:
    assert sorted(got) == sorted(want)
    for key, pixels in got.items():
        assert pixels.dtype == dtype, key
        assert np.array_equal(np.asarray(pixels), want[key]["pixels"]), key


def load(urls: list[str], cache: Path, **kwargs: Any) -> datasets.Dataset:
    files = {"train": urls}
    return datasets.load_dataset("webdataset", data_files=files, split="train", cache_dir=str(cache), **kwargs)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_webdataset_with_the_handler_gives_the_stored_pixels(codec: str, shard_sets: dict, stored: dict) -> None:
    ext = codecs.CODECS[codec].ext
    # The handler goes before "pil": it takes the pixel members, json goes on to webdataset's own handlers.
    samples = list(wds.WebDataset(shard_sets[codec], shardshuffle=False).decode(portable.decode_pixels, "pil"))
    assert_exact({s["__key__"]: s[ext] for s in samples}, stored[codec])
    assert all(s["json"] == stored[codec][s["__key__"]]["meta"] for s in samples)

    tensors = wds.WebDataset(shard_sets[codec], shardshuffle=False).decode(portable.decode_pixels_tensor)
    assert_exact({s["__key__"]: s[ext] for s in tensors}, stored[codec], dtype=torch.int32)


def test_plain_pil_decoding_loses_the_16_bit_values(shard_sets: dict, stored: dict) -> None:
    """Why the handler exists: webdataset's "pil" opens a 16-bit PNG as 8-bit RGB, clipped at 255."""
    for sample in wds.WebDataset(shard_sets["png"], shardshuffle=False).decode("pil"):
        pixels = np.asarray(sample["png"])
        want = stored["png"][sample["__key__"]]["pixels"]
        assert pixels.dtype == np.uint8 and pixels.shape == (*want.shape, 3)
        assert np.array_equal(pixels[..., 0], np.minimum(want, 255))
        assert not np.array_equal(pixels[..., 0], want)
    # webdataset leaves a b2nd member as bytes: nothing in it knows Blosc2.
    sample = next(iter(wds.WebDataset(shard_sets["blosc2"], shardshuffle=False).decode("pil")))
    assert isinstance(sample["b2nd"], bytes)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_datasets_with_the_features_and_transform_gives_the_stored_pixels(
    codec: str, shard_sets: dict, stored: dict, tmp_path: Path
) -> None:
    ext = codecs.CODECS[codec].ext
    ds = load(shard_sets[codec], tmp_path, features=portable.features(codec))
    assert [row["json"] for row in ds] == [stored[codec][key]["meta"] for key in ds["__key__"]]
    ds.set_transform(portable.decode_batch)
    assert_exact({row["__key__"]: row[ext] for row in ds}, stored[codec])

    ds.set_transform(functools.partial(portable.decode_batch, tensor=True))
    assert_exact({row["__key__"]: row[ext] for row in ds}, stored[codec], dtype=torch.int32)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_datasets_default_load_reads_exactly_through_the_transform(
    codec: str, shard_sets: dict, stored: dict, tmp_path: Path
) -> None:
    """Without features: png arrives as a PIL image in a 16-bit mode (exact), b2nd as bytes."""
    ext = codecs.CODECS[codec].ext
    ds = load(shard_sets[codec], tmp_path)
    raw = ds[0][ext]
    if codec == "png":
        assert raw.mode in portable.EXACT_PIL_MODES
    else:
        assert isinstance(raw, bytes)
    ds.set_transform(portable.decode_batch)
    assert_exact({row["__key__"]: row[ext] for row in ds}, stored[codec])


def test_declared_json_fields_are_the_written_ones(stored: dict) -> None:
    for samples in stored.values():
        for sample in samples.values():
            assert list(sample["meta"]) == list(SAMPLE_FIELDS)


def test_features_load_shards_whose_first_samples_lack_a_field(shard_sets: dict, tmp_path: Path) -> None:
    """`datasets` guesses json types from the first 5 samples: null in all five is type null, and the 6th fails."""
    with tarfile.open(shard_sets["png"][0]) as src:
        members = [(m.name, src.extractfile(m).read()) for m in src.getmembers()]  # type: ignore[union-attr]
    path = tmp_path / "lateral-000000.tar"
    with tarfile.open(path, "w") as tar:
        for copy in range(3):  # 3 x the 4 samples of a shard; only the third copy has a laterality
            for name, data in members:
                if name.endswith(".json"):
                    data = json.dumps({**json.loads(data), "laterality": "L" if copy == 2 else None}).encode()
                info = tarfile.TarInfo(f"c{copy}{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DatasetGenerationError) as guessed:
        load([str(path)], tmp_path / "guessed")
    assert "Couldn't cast array of type string to null" in str(guessed.value.__cause__)
    ds = load([str(path)], tmp_path / "declared", features=portable.features("png"))
    assert [row["json"]["laterality"] for row in ds].count("L") == len(members) // 2


def test_unusable_inputs_are_refused_with_the_fix() -> None:
    image = np.arange(600, dtype=np.uint16).reshape(20, 30)
    png = codecs.CODECS["png"].encode(image)
    assert portable.decode_pixels(".json", b"{}") is None
    assert portable.decode_pixels(".txt", png) is None
    assert np.array_equal(portable.decode_pixels(".PNG", png), image)  # type: ignore[arg-type]
    assert np.array_equal(portable.to_pixels({"bytes": png, "path": "k.png"}), image)
    from PIL import Image

    with pytest.raises(ValueError, match="lost the 16-bit values"):
        portable.to_pixels(Image.open(io.BytesIO(png)).convert("RGB"))
    with pytest.raises(ValueError, match="Unknown pixel member 'jpg'"):
        portable.to_pixels(png, "jpg")
    with pytest.raises(ValueError, match=r"Unknown codec 'blosc'\. Known: blosc2, png"):
        portable.features("blosc")
    with pytest.raises(ValueError):
        portable.to_pixels(png[:40], "png")


def test_importing_needs_none_of_the_libraries_it_serves() -> None:
    served = "{'torch', 'webdataset', 'datasets'}"
    code = f"import sys; from radpretrain.shards import portable; print(sorted(set(sys.modules) & {served}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
