"""The one intensity convention for images entering an encoder, written in manifests and encoder files."""

from __future__ import annotations

import numpy as np

#: Images entering an encoder: one channel, MONOCHROME2 (brighter = more attenuation), windowed to
#: [0, 1] (DICOM window, else the robust intensity range), then normalised as (x - MEAN) / STD.
CONVENTION = "mono2-window-unit-v1"
MEAN = 0.5
STD = 0.25


def apply_window(pixels: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window (DICOM PS3.3 C.11.2.1.2 without the half-pixel detail) to a new float32 array in [0, 1]."""
    return apply_window_(pixels.astype(np.float32), center, width)


def apply_window_(image: np.ndarray, center: float, width: float) -> np.ndarray:
    """`apply_window` in place on a float32 array (the loader's views: no temporaries)."""
    width = max(float(width), 1.0)
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
