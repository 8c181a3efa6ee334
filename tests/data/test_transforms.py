"""Radiograph augmentation: shapes and ranges, window jitter around the stored window, no flips, seeded repeats."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from radpretrain import intensity
from radpretrain.data.transforms import (
    LINEAR_MAX_SHRINK,
    MISSING,
    AugmentConfig,
    RadiographCrop,
    ViewsConfig,
    build_sample_fn,
    encode_labels,
    jitter_window,
    make_views,
    resize_view,
    stored_window,
)
from radpretrain.errors import ConfigError

VOCAB = {
    "body_part": ["chest", "hand", "knee", "unknown"],
    "age_bucket": ["0-1", "18-39", "40-64"],
    "sex": ["F", "M", "O"],
    "view": ["PA", "AP", "LAT"],
}
LOW = (0.0 - intensity.MEAN) / intensity.STD
HIGH = (1.0 - intensity.MEAN) / intensity.STD


def radiograph(rows: int = 128, cols: int = 100, seed: int = 0) -> dict:
    """A stored 12-bit-like image: soft tissue ellipse, a bright 'bone' bar on the patient's right (image left)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    img = 600 + 1400 * np.exp(-(((yy - rows / 2) / (rows / 3)) ** 2 + ((xx - cols / 2) / (cols / 3)) ** 2))
    img[:, : cols // 3] += 900
    img += rng.normal(0, 20, img.shape)
    pixels = np.clip(img, 0, 4095).astype(np.uint16)
    meta = {
        "window_center": 1500.0,
        "window_width": 2000.0,
        "intensity_low": 620.0,
        "intensity_high": 2900.0,
        "body_part": "chest",
        "age_bucket": "40-64",
        "sex": "M",
        "view": None,
    }
    return {"key": "0" * 24, "pixels": pixels, "meta": meta}


def quiet(cfg: AugmentConfig, **changes: object) -> AugmentConfig:
    """The same policy without pixel noise, gamma, blur and affine: windowing is then easy to check."""
    return dataclasses.replace(cfg, gamma_p=0.0, noise_p=0.0, blur_p=0.0, affine_p=0.0, **changes)


def test_views_have_encoder_shape_dtype_and_range() -> None:
    views = make_views(radiograph(), ["view0", "view1", "plain"], ViewsConfig(), image_size=48, rng=0)
    assert sorted(views) == ["plain", "view0", "view1"]
    for view in views.values():
        assert view.shape == (1, 48, 48) and view.dtype == np.float32
        assert view.min() >= LOW - 1e-6 and view.max() <= HIGH + 1e-6
        assert view.std() > 0.05
    assert not np.array_equal(views["view0"], views["view1"])


def test_window_jitter_stays_around_the_stored_window() -> None:
    cfg = AugmentConfig.strong()
    rng = np.random.default_rng(0)
    draws = np.array([jitter_window(1500.0, 2000.0, cfg, rng) for _ in range(2000)])
    centers, widths = draws[:, 0], draws[:, 1]
    assert np.all(np.abs(centers - 1500.0) <= cfg.window_center_jitter * 2000.0 + 1e-9)
    assert np.all(widths >= 2000.0 / (1 + cfg.window_width_jitter) - 1e-9)
    assert np.all(widths <= 2000.0 * (1 + cfg.window_width_jitter) + 1e-9)
    # it does move: the draws reach most of the allowed range on both sides
    assert np.ptp(centers) > 1.6 * cfg.window_center_jitter * 2000.0
    assert widths.min() < 2000.0 / 1.2 and widths.max() > 2000.0 * 1.2
    light = AugmentConfig.light()
    assert jitter_window(1500.0, 2000.0, light, rng) == (1500.0, 2000.0)


def test_stored_centre_maps_near_mid_grey_under_jitter() -> None:
    sample = radiograph()
    sample["pixels"] = np.full((64, 64), 1500, np.uint16)  # every pixel at the stored window centre
    cfg = ViewsConfig(strong=quiet(AugmentConfig.strong()))
    values = []
    for seed in range(40):
        view = make_views(sample, ["view0"], cfg, image_size=32, rng=seed)["view0"]
        values.append(float(view.mean()) * intensity.STD + intensity.MEAN)  # back to the [0, 1] window scale
    jit = cfg.strong.window_center_jitter * (1 + cfg.strong.window_width_jitter)
    assert all(abs(v - 0.5) <= jit + 1e-4 for v in values)
    assert np.std(values) > 0.02  # the window really is jittered
    plain = make_views(sample, ["plain"], cfg, image_size=32, rng=0)["plain"]
    np.testing.assert_allclose(plain * intensity.STD + intensity.MEAN, 0.5, atol=1e-6)


def test_no_horizontal_flip_by_default() -> None:
    assert AugmentConfig.strong().hflip_p == 0.0 and AugmentConfig.light().hflip_p == 0.0
    sample = radiograph()
    whole = quiet(AugmentConfig.strong(), crop_scale=(1.0, 1.0), crop_ratio=(100 / 128, 100 / 128))
    for seed in range(30):
        view = make_views(sample, ["view0"], ViewsConfig(strong=whole), image_size=32, rng=seed)["view0"][0]
        assert view[:, :8].mean() > view[:, -8:].mean()  # the bright side stays on the image left
    flipped = ViewsConfig(strong=dataclasses.replace(whole, hflip_p=1.0))
    view = make_views(sample, ["view0"], flipped, image_size=32, rng=0)["view0"][0]
    assert view[:, :8].mean() < view[:, -8:].mean()


def test_seeded_rng_repeats_and_other_seeds_differ() -> None:
    sample = radiograph()
    a = make_views(sample, ["view0", "view1"], ViewsConfig(), image_size=32, rng=7)
    b = make_views(sample, ["view0", "view1"], ViewsConfig(), image_size=32, rng=7)
    c = make_views(sample, ["view0", "view1"], ViewsConfig(), image_size=32, rng=8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["view0"], c["view0"])
    gen = np.random.default_rng(3)
    d = make_views(sample, ["view0"], ViewsConfig(), image_size=32, rng=gen)
    e = make_views(sample, ["view0"], ViewsConfig(), image_size=32, rng=np.random.default_rng(3))
    assert np.array_equal(d["view0"], e["view0"])


def test_evaluation_policy_is_deterministic_letterbox() -> None:
    sample = radiograph(rows=128, cols=64)
    cfg = ViewsConfig(plain=AugmentConfig.evaluation())
    a = make_views(sample, ["plain"], cfg, image_size=32, rng=1)["plain"][0]
    b = make_views(sample, ["plain"], cfg, image_size=32, rng=2)["plain"][0]
    assert np.array_equal(a, b)
    # a 2:1 image fills the middle half of the columns; the padding is the darkest value
    assert np.all(a[:, :7] == pytest.approx(LOW)) and np.all(a[:, -7:] == pytest.approx(LOW))
    assert a[:, 10:22].std() > 0.05


def test_window_falls_back_to_robust_range_then_image() -> None:
    sample = radiograph()
    assert stored_window(sample["pixels"], sample["meta"]) == (1500.0, 2000.0)
    meta = {**sample["meta"], "window_center": None, "window_width": None}
    assert stored_window(sample["pixels"], meta) == (1760.0, 2280.0)
    meta = {"window_center": 10.0, "window_width": 0.0}
    center, width = stored_window(sample["pixels"], meta)
    low, high = np.percentile(sample["pixels"], (0.5, 99.5))
    assert center == pytest.approx((low + high) / 2) and width == pytest.approx(high - low)


def test_labels_index_the_manifest_vocab_and_mark_missing() -> None:
    meta = {"body_part": "hand", "age_bucket": "0-1", "sex": None, "view": "OBL"}
    assert encode_labels(meta, VOCAB) == {"body_part": 1, "age_bucket": 0, "sex": MISSING, "view": MISSING}
    assert encode_labels({"body_part": "unknown"}, VOCAB)["body_part"] == MISSING
    assert encode_labels({"body_part": "chest"}, {})["body_part"] == MISSING


def test_sample_fn_gives_tensors_for_the_loader() -> None:
    fn = build_sample_fn(("view0", "plain"), {"strong": {"crop_scale": [0.5, 1.0]}}, VOCAB, 32, seed=1)
    out = fn(radiograph())
    assert set(out) == {"view0", "plain", "body_part", "age_bucket", "sex", "view"}
    assert out["view0"].shape == (1, 32, 32) and out["view0"].dtype == torch.float32
    assert out["body_part"].dtype == torch.long and int(out["body_part"]) == 0
    assert int(out["age_bucket"]) == 2 and int(out["sex"]) == 1 and int(out["view"]) == MISSING


class _Repeat(IterableDataset):
    def __init__(self, fn: Callable[[dict], dict], n: int) -> None:
        self.fn, self.n = fn, n

    def __iter__(self) -> Iterator[dict]:
        for _ in range(self.n):
            yield self.fn(radiograph())


def test_loader_workers_draw_different_streams_and_seeded_runs_repeat() -> None:
    fn = build_sample_fn(("view0",), ViewsConfig(), VOCAB, 24, seed=0)

    def run() -> list[torch.Tensor]:
        torch.manual_seed(123)
        loader = DataLoader(_Repeat(fn, 2), batch_size=None, num_workers=2)
        return [batch["view0"] for batch in loader]

    first, second = run(), run()
    assert len(first) == 4
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    # items 0 and 1 come from different workers, given the same input: different augmentations
    assert not torch.equal(first[0], first[1])


def test_bad_configs_are_refused_with_a_fix() -> None:
    with pytest.raises(ConfigError, match="crop_scale"):
        make_views(radiograph(), ["view0"], ViewsConfig(strong=AugmentConfig(crop_scale=(0.9, 0.2))))
    with pytest.raises(ConfigError, match="hflip_p"):
        AugmentConfig(hflip_p=2.0).validate()
    with pytest.raises(ConfigError, match="Did you mean 'view0'"):
        make_views(radiograph(), ["veiw0"], ViewsConfig())
    with pytest.raises(ConfigError, match=r"augment\.strong\.crop_scael"):
        build_sample_fn(("view0",), {"strong": {"crop_scael": [0.5, 1.0]}}, VOCAB, 32)


@pytest.mark.parametrize(
    ("shape", "flag"),
    [
        ((400, 400), cv2.INTER_LINEAR),
        ((440, 300), cv2.INTER_LINEAR),
        ((500, 400), cv2.INTER_AREA),
        ((460, 200), cv2.INTER_AREA),
    ],
)
def test_crops_shrunk_at_most_2x_are_resized_bilinearly_larger_shrinks_by_area(
    shape: tuple[int, int], flag: int
) -> None:
    image = np.random.default_rng(0).normal(1000.0, 200.0, shape).astype(np.float32)
    other = cv2.INTER_AREA if flag == cv2.INTER_LINEAR else cv2.INTER_LINEAR
    assert (max(shape) / 224 <= LINEAR_MAX_SHRINK) == (flag == cv2.INTER_LINEAR)
    out = resize_view(image, (224, 224))
    assert out.shape == (224, 224) and out.dtype == np.float32
    assert np.array_equal(out, cv2.resize(image, (224, 224), interpolation=flag))
    assert not np.array_equal(out, cv2.resize(image, (224, 224), interpolation=other))


def test_the_random_crop_resizes_the_region_it_drew() -> None:
    image = np.random.default_rng(1).normal(1000.0, 200.0, (400, 300)).astype(np.float32)
    whole = RadiographCrop(size=(100, 75), scale=(1.0, 1.0), ratio=(0.75, 0.75), p=1.0)
    assert np.array_equal(whole(image=image)["image"], cv2.resize(image, (75, 100), interpolation=cv2.INTER_AREA))
    half = RadiographCrop(size=(100, 100), scale=(0.25, 0.25), ratio=(1.0, 1.0), p=1.0)
    out = half(image=image)["image"]
    assert out.shape == (100, 100)
    matches = [
        (y, x)
        for y in range(0, 401 - 173)
        for x in range(0, 301 - 173)
        if np.array_equal(out, cv2.resize(image[y : y + 173, x : x + 173], (100, 100), interpolation=cv2.INTER_LINEAR))
    ]
    assert len(matches) == 1
