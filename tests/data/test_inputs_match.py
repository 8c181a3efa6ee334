"""One PNG reaches the encoder as the same tensor through a shard (pretraining) and through a cohort (finetuning)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from radpretrain import intensity
from radpretrain.data import letterbox
from radpretrain.data.cohorts import load_cohort
from radpretrain.data.dataset import CohortDataset
from radpretrain.data.transforms import AugmentConfig, ViewsConfig, make_views
from radpretrain.shards import reader
from radpretrain.shards.format import ShardSet
from radpretrain.shards.plan import ShardConfig

try:  # the writer is being split: `shard` moves to shards.run
    from radpretrain.shards.run import shard  # type: ignore[import-not-found]
except ImportError:
    from radpretrain.shards.writer import shard

#: Side of the encoder input in both paths.
SIZE = 48


def _radiograph(dtype: type, rows: int = 60, cols: int = 90) -> np.ndarray:
    """A non-square image whose robust range is well inside its dtype's range, with a few outliers."""
    rng = np.random.default_rng(4)
    top = np.iinfo(dtype).max
    y, x = np.mgrid[:rows, :cols]
    image = 0.2 + 0.5 * x / cols + 0.2 * (((y - rows / 2) ** 2 + (x - cols / 3) ** 2) < (rows / 4) ** 2)
    image = image + rng.normal(0, 0.02, image.shape)
    image.flat[rng.choice(image.size, 8, replace=False)] = rng.choice([0.0, 1.0], 8)  # dead and hot pixels
    return np.clip(image * top, 0, top).astype(dtype)


def _through_shard(tmp_path: Path, image: np.ndarray, shard_side: int) -> np.ndarray:
    src = tmp_path / "src"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), image)
    config = ShardConfig(size=shard_side, shard_size=10, val_fraction=0.0, test_fraction=0.0)
    shard(src, tmp_path / "shards", config, key=tmp_path / "k", progress=False)
    [sample] = list(reader.build_pipeline(ShardSet.open(tmp_path / "shards").urls(), shuffle=0))
    views = ViewsConfig(plain=AugmentConfig.evaluation())  # no augmentation: the whole image, stored window
    return make_views(sample, ["plain"], views, image_size=SIZE)["plain"]


def _through_cohort(tmp_path: Path, image: np.ndarray) -> dict[str, torch.Tensor]:
    folder = tmp_path / "cohort" / "normal"  # a class-folder cohort of one case
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "a.png"), image)
    return CohortDataset(load_cohort(tmp_path / "cohort"), size=SIZE, augment=False)[0]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16], ids=["8-bit", "16-bit"])
def test_one_png_gives_the_same_tensor_through_a_shard_and_a_cohort(tmp_path: Path, dtype: type) -> None:
    image = _radiograph(dtype)
    low, high = np.percentile(image, (0.5, 99.5))
    assert 0.05 * np.iinfo(dtype).max < low < high < 0.95 * np.iinfo(dtype).max  # /255 would differ
    view = _through_shard(tmp_path, image, shard_side=128)  # stored at its own size: the same pixels
    item = _through_cohort(tmp_path, image)
    assert view.shape == item["image"].shape == (1, SIZE, SIZE)
    np.testing.assert_allclose(item["image"].numpy(), view, atol=1e-5)
    # Letterboxed, not stretched: 60 x 90 fits 48 x 48 as 32 x 48, eight padding rows above and below,
    # padded with 0 in [0, 1] (the normalised background) in both paths.
    expected_valid = letterbox.valid_mask(letterbox.box((32, SIZE), (SIZE, SIZE)), (SIZE, SIZE))
    assert torch.equal(item["valid"][0], torch.from_numpy(expected_valid))
    background = (0.0 - intensity.MEAN) / intensity.STD
    assert np.all(view[0, :8] == background) and np.all(view[0, 40:] == background)
    assert view[0, 8:40].std() > 0.3


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16], ids=["8-bit", "16-bit"])
def test_a_shard_stored_smaller_than_the_file_stays_close(tmp_path: Path, dtype: type) -> None:
    # The shard keeps a 64 px copy (area-averaged, rounded to whole stored units) and takes its robust
    # range from it (averaging narrows it by 2-3 % here); the cohort reads the file itself and resizes
    # once. The two still agree within a few per cent of the window, the worst pixel being a hot pixel
    # resampled twice.
    image = _radiograph(dtype)
    view = _through_shard(tmp_path, image, shard_side=64)
    item = _through_cohort(tmp_path, image)["image"].numpy()
    difference = np.abs(item - view) * intensity.STD  # in the [0, 1] window scale
    assert difference.mean() < 0.01 and np.percentile(difference, 99) < 0.05 and difference.max() < 0.1
