"""The one letterbox of pretraining views and cohort cases: fit keeping the aspect ratio, centre, pad."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Padding value in the [0, 1] windowed scale, before `intensity.normalize`: black, as air in a
#: MONOCHROME2 radiograph; normalised it is (0 - MEAN) / STD = -2. Masks are padded with 0 (background).
FILL = 0.0


def fit_shape(shape: Sequence[int], size: Sequence[int]) -> tuple[int, ...]:
    """The shape `shape` is resized to before padding to `size`.

    The image plane (the last two axes) keeps its aspect ratio: one scale, the largest at which both
    sides fit. A 3D volume's depth (the first axis) is resized to its size on its own: voxel counts carry
    no physical shape without the slice spacing, which cohort volumes do not always give, while in-plane
    pixels are square in radiographs, CT and most MR.
    """
    if len(shape) != len(size) or len(shape) not in (2, 3):
        raise ValueError(f"shape {tuple(shape)} and size {tuple(size)} must both be 2D or 3D")
    (rows, cols), (out_rows, out_cols) = shape[-2:], size[-2:]
    scale = min(out_rows / rows, out_cols / cols)
    plane = (min(out_rows, max(1, round(rows * scale))), min(out_cols, max(1, round(cols * scale))))
    return (*size[:-2], *plane)


def box(shape: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    """Where an array of `shape` sits when centred in `size` (the extra pixel of an odd margin goes last)."""
    return tuple(slice((s - n) // 2, (s - n) // 2 + n) for n, s in zip(shape, size, strict=True))


def pad(array: np.ndarray, size: Sequence[int], fill: float = FILL) -> tuple[np.ndarray, tuple[slice, ...]]:
    """`array` centred in a new array of shape `size` filled with `fill`, and the slices it occupies."""
    region = box(array.shape, size)
    out = np.full(tuple(size), fill, dtype=array.dtype)
    out[region] = array
    return out, region


def resize(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """float32 `array` resized to `shape`: OpenCV area averaging to shrink a plane (no aliasing), bilinear to
    grow it; a volume plane by plane, then linearly (area averaging to shrink) along its depth."""
    import cv2

    array = np.ascontiguousarray(array, dtype=np.float32)
    shape = tuple(shape)
    if array.shape == shape:
        return array
    plane = shape[-2:]
    if array.shape[-2:] != plane:
        shrink = array.shape[-2] > plane[0] or array.shape[-1] > plane[1]
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        if array.ndim == 2:
            return np.asarray(cv2.resize(array, plane[::-1], interpolation=interpolation), dtype=np.float32)
        array = np.stack([cv2.resize(s, plane[::-1], interpolation=interpolation) for s in array]).astype(np.float32)
    if array.shape[0] != shape[0]:
        import torch

        tensor = torch.from_numpy(array)[None, None]
        mode = "area" if array.shape[0] > shape[0] else "trilinear"
        kwargs = {} if mode == "area" else {"align_corners": False}
        array = torch.nn.functional.interpolate(tensor, size=shape, mode=mode, **kwargs)[0, 0].numpy()
    return array


def fit(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """`array` (float32) resized to `fit_shape`, not yet padded: windowing comes between fit and pad."""
    return resize(array, fit_shape(array.shape, size))


def letterbox(array: np.ndarray, size: Sequence[int], fill: float = FILL) -> tuple[np.ndarray, tuple[slice, ...]]:
    """`fit` then `pad`: the float32 array of shape `size` and the slices of its unpadded region."""
    return pad(fit(array, size), size, fill)


def valid_mask(region: Sequence[slice], size: Sequence[int]) -> np.ndarray:
    """A bool array of shape `size`, True inside `region` (the unpadded pixels that metrics score)."""
    mask = np.zeros(tuple(size), dtype=bool)
    mask[tuple(region)] = True
    return mask
