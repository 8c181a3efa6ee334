"""The one letterbox: aspect ratio kept in the image plane, centred, padded with 0 in [0, 1] in both paths."""

from __future__ import annotations

import numpy as np
import pytest

from radpretrain import intensity
from radpretrain.data import letterbox
from radpretrain.data.transforms import AugmentConfig, ViewsConfig, make_views


@pytest.mark.parametrize(
    ("shape", "size", "fitted"),
    [
        ((60, 90), (48, 48), (32, 48)),
        ((90, 60), (48, 48), (48, 32)),
        ((100, 100), (32, 40), (32, 32)),
        ((7, 7), (28, 28), (28, 28)),  # grows too
        ((13, 67, 82), (16, 16, 16), (16, 13, 16)),  # depth on its own, the plane keeps 67:82
        ((4, 10, 10), (8, 5, 5), (8, 5, 5)),
    ],
)
def test_fit_shape_keeps_the_plane_aspect_ratio(shape: tuple, size: tuple, fitted: tuple) -> None:
    assert letterbox.fit_shape(shape, size) == fitted


def test_letterbox_centres_and_pads_with_fill() -> None:
    image = np.ones((60, 90), np.float32)
    out, region = letterbox.letterbox(image, (48, 48))
    assert out.shape == (48, 48) and region == (slice(8, 40), slice(0, 48))
    assert np.allclose(out[region], 1.0) and np.all(out[:8] == letterbox.FILL) and np.all(out[40:] == letterbox.FILL)
    valid = letterbox.valid_mask(region, (48, 48))
    assert valid.sum() == 32 * 48 and valid[8:40].all()
    odd, region = letterbox.pad(np.ones((2, 3), np.float32), (5, 3), fill=7.0)
    assert region == (slice(1, 3), slice(0, 3)) and odd[0, 0] == odd[3, 0] == odd[4, 0] == 7.0
    with pytest.raises(ValueError, match="must both be 2D or 3D"):
        letterbox.fit_shape((4, 4), (4, 4, 4))


def test_a_volume_is_resized_plane_by_plane_then_along_its_depth() -> None:
    volume = np.stack([np.full((6, 6), v, np.float32) for v in (0.0, 1.0)])
    out = letterbox.resize(volume, (4, 3, 3))
    assert out.shape == (4, 3, 3)
    depth = out[:, 1, 1]
    assert depth[0] == 0.0 and depth[-1] == 1.0 and np.all(np.diff(depth) >= 0)  # linear along depth
    assert np.allclose(out, out[:, :1, :1])  # each plane stays flat


def test_pretraining_letterbox_pads_with_the_background_whatever_the_window() -> None:
    pixels = np.full((64, 32), 3000, np.uint16)
    # A window whose lower end is below stored 0: padding stored 0 before windowing would come out grey.
    sample = {"pixels": pixels, "meta": {"window_center": 0.0, "window_width": 8000.0}}
    view = make_views(sample, ["plain"], ViewsConfig(plain=AugmentConfig.evaluation()), image_size=32)["plain"][0]
    background = (letterbox.FILL - intensity.MEAN) / intensity.STD
    assert np.all(view[:, :8] == background) and np.all(view[:, 24:] == background)
    inside = (3000 - (0 - 4000)) / 8000
    assert np.allclose(view[:, 8:24], (inside - intensity.MEAN) / intensity.STD)
