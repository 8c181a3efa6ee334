"""The one intensity convention for images entering an encoder, written in manifests and encoder files."""

from __future__ import annotations

import numpy as np

#: Images entering an encoder: one channel, MONOCHROME2 (brighter = more attenuation), windowed to
#: [0, 1], letterboxed (padding 0 in [0, 1]), then normalised as (x - MEAN) / STD.
#:
#: The window (`image_window`, one rule for shards and cohorts): a DICOM image's header window (Window
#: Center/Width or VOI LUT, in modality-LUT units after MONOCHROME1 inversion) when it has one. Every
#: other image (DICOM without a window, 8-bit and 16-bit PNG/JPEG, NRRD/NIfTI volumes) gets its robust
#: range: the `ROBUST_PERCENTILES` (0.5 and 99.5 %) of its pixel values before resizing to the encoder's
#: input (a shard computes them on its stored image), as centre (low + high) / 2 and width high - low, at
#: least one stored unit (1e-6 for float volumes). 8-bit display images are not divided by 255: they
#: get the robust range like the rest, so an image reads the same from a shard and from a cohort.
CONVENTION = "mono2-window-unit-v1"
MEAN = 0.5
STD = 0.25
#: The narrowest window of an image with float pixel values (NRRD/NIfTI volumes scaled to [0, 1] have
#: no stored unit); integer images are floored at one stored unit, as `apply_window` floors DICOM windows.
FLOAT_MIN_WIDTH = 1e-6


def range_window(low: float, high: float, min_width: float = 1.0) -> tuple[float, float]:
    """(centre, width) of the window from `low` to `high`, the width at least `min_width`."""
    return (float(low) + float(high)) / 2.0, max(float(high) - float(low), float(min_width))


def robust_window(pixels: np.ndarray) -> tuple[float, float]:
    """The robust range of an image without a header window, as (centre, width) in its own units."""
    # format.py imports this module for CONVENTION; the percentiles live there with the shard format.
    from radpretrain.shards.format import ROBUST_PERCENTILES

    low, high = np.percentile(pixels, ROBUST_PERCENTILES)
    return range_window(low, high, min_width_of(pixels))


def min_width_of(pixels: np.ndarray) -> float:
    """The narrowest window for these pixels: one stored unit for integers, FLOAT_MIN_WIDTH for floats."""
    return 1.0 if pixels.dtype.kind in "iub" else FLOAT_MIN_WIDTH


def image_window(pixels: np.ndarray, header_window: tuple[float, float] | None) -> tuple[float, float]:
    """The convention's window of one decoded image (before resizing): its header window (width at least one
    unit, as `apply_window` has always floored it), else its robust range."""
    if header_window is not None:
        return float(header_window[0]), max(float(header_window[1]), 1.0)
    return robust_window(pixels)


def apply_window(pixels: np.ndarray, center: float, width: float, min_width: float = 1.0) -> np.ndarray:
    """Linear window (DICOM PS3.3 C.11.2.1.2 without the half-pixel detail) to a new float32 array in [0, 1].

    The width is floored at `min_width` (one stored unit; `FLOAT_MIN_WIDTH` for float volumes).
    """
    return apply_window_(pixels.astype(np.float32), center, width, min_width)


def apply_window_(image: np.ndarray, center: float, width: float, min_width: float = 1.0) -> np.ndarray:
    """`apply_window` in place on a float32 array (the loader's views: no temporaries)."""
    width = max(float(width), float(min_width))
    image -= np.float32(float(center) - width / 2.0)
    image *= np.float32(1.0 / width)
    return np.clip(image, 0.0, 1.0, out=image)


def normalize(image01: np.ndarray) -> np.ndarray:
    """Map a [0, 1] image to the encoder's input scale (a new float32 array)."""
    return normalize_(np.array(image01, dtype=np.float32))


def normalize_(image01: np.ndarray) -> np.ndarray:
    """`normalize` in place on a float32 array."""
    image01 -= np.float32(MEAN)
    image01 *= np.float32(1.0 / STD)
    return image01


def check_convention(found: str, where: str) -> None:
    """Refuse an encoder or data set whose intensity convention is not ours."""
    from radpretrain.errors import ConfigError

    if found != CONVENTION:
        raise ConfigError(
            f"{where} uses intensity convention '{found}' but this version expects '{CONVENTION}'; "
            "re-export the encoder or re-shard the data with this version of radpretrain"
        )
