"""Exact 16-bit shard pixels for readers outside radpretrain: a webdataset handler and `datasets` helpers.

ds = wds.WebDataset(urls).decode(portable.decode_pixels, "pil")  # sample["png"]: uint16 HxW numpy
ds = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train",
                           features=portable.features("png"))   # or "blosc2"
ds.set_transform(portable.decode_batch)                           # ds[i]["png"]: uint16 HxW numpy
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from radpretrain.shards import codecs
from radpretrain.shards.format import SAMPLE_FIELDS

# torch, webdataset and datasets are imported only when asked for: users of one library need not install the others.
if TYPE_CHECKING:
    import datasets
    import torch


#: PIL modes that hold a 16-bit PNG's values unchanged (current Pillow opens one as "I;16", older ones as "I").
EXACT_PIL_MODES = ("I;16", "I;16L", "I;16B", "I")


def decode_pixels(key: str, data: bytes) -> np.ndarray | None:
    """A webdataset decoder handler: a `png` / `b2nd` member -> its stored uint16 pixels (HxW numpy), else None.

    Pass it before any image handler (`.decode(decode_pixels, "pil")`) so that it takes the pixel members
    first; json and other members go on to the handlers after it.
    """
    ext = key.rsplit(".", 1)[-1].lower()
    if ext not in codecs.CODECS_BY_EXT:
        return None
    return codecs.decode_image(ext, data)


def decode_pixels_tensor(key: str, data: bytes) -> torch.Tensor | None:
    """As `decode_pixels`, as an int32 HxW torch tensor: exact values, and every op (torch.uint16 has few)."""
    pixels = decode_pixels(key, data)
    return None if pixels is None else _tensor(pixels)


def to_pixels(value: Any, ext: str = "png") -> np.ndarray:
    """A `png` / `b2nd` column value as `datasets` gives it -> the stored uint16 pixels (HxW numpy).

    ValueError if it is broken or its values were lost. `value` is bytes (a `b2nd` member, or `png` under
    `features()`), a {"bytes", "path"} dict (`png` as `datasets.Image(decode=False)`) or a PIL image (`png`
    as `datasets.Image()`, the default): exact in a 16-bit mode, refused in an 8-bit one, whose values were
    clipped before they got here.
    """
    if ext not in codecs.CODECS_BY_EXT:
        raise ValueError(f"Unknown pixel member {ext!r}. Known: {', '.join(codecs.IMAGE_EXTS)}")
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, bytes | bytearray | memoryview):
        return codecs.decode_image(ext, bytes(value))
    mode = getattr(value, "mode", None)
    if mode is None:
        raise ValueError(f"not a shard pixel member: {type(value).__name__}")
    if mode not in EXACT_PIL_MODES:
        raise ValueError(
            f"a PIL image in mode {mode} has lost the 16-bit values; load with features=portable.features(codec) "
            "or cast the column to datasets.Image(decode=False)"
        )
    pixels = np.asarray(value)
    if pixels.min(initial=0) < 0 or pixels.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError(f"a PIL image in mode {mode} holds values outside uint16")
    return pixels.astype(np.uint16)


def decode_batch(batch: dict[str, list[Any]], tensor: bool = False) -> dict[str, list[Any]]:
    """For `Dataset.set_transform` / `with_transform` (or a batched `.map`): each `png` / `b2nd` value -> pixels.

    The pixel columns keep their names and hold uint16 HxW numpy arrays, or int32 torch tensors with
    `tensor=True` (`ds.set_transform(functools.partial(decode_batch, tensor=True))`); None stays None.
    """
    out = dict(batch)
    for ext in codecs.IMAGE_EXTS:
        if ext in batch:
            decoded = [None if value is None else to_pixels(value, ext) for value in batch[ext]]
            out[ext] = [_tensor(p) if tensor and p is not None else p for p in decoded]
    return out


def features(codec: str = "png") -> datasets.Features:
    """`datasets` features of a shard set written with `codec`: pass as `load_dataset(..., features=...)`.

    The pixel member stays bytes for `decode_batch` / `to_pixels` (no PIL decode), and the json fields get
    their declared types instead of ones guessed from the first samples.
    """
    if codec not in codecs.CODECS:
        raise ValueError(f"Unknown codec {codec!r}. Known: {', '.join(sorted(codecs.CODECS))}")
    import datasets

    def value_type(name: str) -> Any:
        if name.startswith("list:"):
            return [datasets.Value(name.removeprefix("list:"))]
        return datasets.Value(name)

    ext = codecs.CODECS[codec].ext
    pixels = datasets.Image(decode=False) if ext == "png" else datasets.Value("binary")
    return datasets.Features(
        {
            # Declared: `datasets` infers types from the first 5 samples, and a field null in all five (laterality,
            # often) becomes type null and fails the load at the first sample that has a value.
            "json": {name: value_type(kind) for name, kind in SAMPLE_FIELDS.items()},
            ext: pixels,
            "__key__": datasets.Value("string"),
            "__url__": datasets.Value("string"),
        }
    )


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(pixels.astype(np.int32))
