"""How a shard sample's 16-bit pixels are stored: one registered codec per tar member extension.

- "png": 16-bit grayscale PNG. Any image tool opens it; the smallest on smooth images.
- "blosc2": a Blosc2 NDArray frame (B2ND, LZ4HC over byte-shuffled pixels), which python-blosc2 and
  C-Blosc2 read. About 15x faster to decode than PNG, 3-7x faster to encode; the same size as PNG on noisy
  radiographs, about half again as large on smooth ones (numbers below).

Measured on 512 px images, one core (`make` venv; synthetic 12-bit radiographs / pydicom-data RG1 and RG3,
bits per pixel and ms per image): png 8.9 / 12.1 / 3.0 bpp, encode 5.4 / 6.7 / 4.1, decode 2.4 / 2.9 / 2.2;
blosc2 9.1 / 12.5 / 4.8 bpp, encode 0.8 / 1.8 / 1.9, decode 0.14 / 0.21 / 0.12. Decoding is most of what
the loader spends on a sample besides the views, so "blosc2" is for CPU-bound training; "png" for disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from radpretrain.errors import ShardError

#: 16-bit PNG settings: zlib level 1, run-length strategy, the "up" filter on every row. Measured on 512 px
#: images (30 synthetic 12-bit radiographs / pydicom-data RG1 and RG3), one core, against level 1 with
#: libpng's adaptive filters: encode 5.3 / 5.4 ms instead of 13.1 / 11.6, decode 2.4 / 2.6 ms instead of
#: 3.7 / 3.4, and 2-4 % fewer bytes (9.15 / 7.36 bits per pixel instead of 9.31 / 7.68). Level 6 with
#: adaptive filters is 4.5x slower to encode than level 1 for ~10 % fewer bytes.
PNG_PARAMS = (
    (cv2.IMWRITE_PNG_COMPRESSION, 1),
    (cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE),
    (cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP),
)
#: LZ4HC at level 1 over byte-shuffled 16-bit pixels, one block, one thread (the loader's workers are the
#: parallelism). Frames name their codec and filter, so shards written with other settings still read.
#: Measured as above: LZ4 level 9 over bit-shuffled pixels decodes in 0.23 / 0.23 / 0.25 ms (the bit
#: unshuffle is most of it) for -3 / +2 / -6 % bytes; LZ4HC level 3 and up encodes in 4-30 ms; zstd level 1
#: with byte shuffle decodes in 0.38 / 0.41 / 0.14 ms.
BLOSC2_CODEC, BLOSC2_LEVEL, BLOSC2_FILTER = "LZ4HC", 1, "SHUFFLE"


def encode_png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image, [value for pair in PNG_PARAMS for value in pair])
    if not ok:
        raise ShardError("PNG encoding failed")
    return bytes(data.tobytes())


def decode_png(data: bytes) -> np.ndarray:
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if pixels is None or pixels.ndim != 2:
        raise ValueError("png member is not a grayscale image")
    return pixels


def encode_blosc2(image: np.ndarray) -> bytes:
    import blosc2

    cparams = blosc2.CParams(
        codec=getattr(blosc2.Codec, BLOSC2_CODEC),
        clevel=BLOSC2_LEVEL,
        filters=[getattr(blosc2.Filter, BLOSC2_FILTER)],
        filters_meta=[0],
        typesize=image.dtype.itemsize,
        nthreads=1,
    )
    array = np.ascontiguousarray(image)
    return bytes(blosc2.asarray(array, cparams=cparams, chunks=array.shape, blocks=array.shape).to_cframe())


def decode_blosc2(data: bytes) -> np.ndarray:
    import blosc2

    try:
        array = blosc2.ndarray_from_cframe(data)
        if array.chunks == array.shape and array.blocks == array.shape:  # as written here: one block, C order
            pixels = np.empty(array.shape, dtype=array.dtype)
            array.schunk.decompress_chunk(0, pixels)
        else:
            pixels = np.asarray(array[()])
    except Exception as exc:  # blosc2 raises RuntimeError / ValueError / its own types on corrupt frames
        raise ValueError(f"b2nd member is not a Blosc2 array ({type(exc).__name__})") from None
    if pixels.ndim != 2 or pixels.dtype.kind not in "ui":
        raise ValueError(f"b2nd member is not a grayscale image (shape {pixels.shape}, {pixels.dtype})")
    return pixels


@dataclass(frozen=True)
class Codec:
    """A storage format: the tar member extension it is written under, and its two directions."""

    ext: str
    encode: Callable[[np.ndarray], bytes]
    decode: Callable[[bytes], np.ndarray]


#: Codecs by the name `ShardConfig.codec` takes; a reader recognises each by its member extension.
CODECS: dict[str, Codec] = {
    "png": Codec("png", encode_png, decode_png),
    "blosc2": Codec("b2nd", encode_blosc2, decode_blosc2),
}
#: Codecs by the tar member extension they are stored under.
CODECS_BY_EXT: dict[str, Codec] = {codec.ext: codec for codec in CODECS.values()}
#: Tar member extensions that hold a sample's pixels.
IMAGE_EXTS: tuple[str, ...] = tuple(CODECS_BY_EXT)


def decode_image(ext: str, data: bytes) -> np.ndarray:
    """The uint16 pixels of one image member, by its extension ("png", "b2nd"); ValueError if broken."""
    return CODECS_BY_EXT[ext].decode(bytes(data)).astype(np.uint16, copy=False)


def decode_member(sample: dict[str, object]) -> np.ndarray:
    """The uint16 pixels of a webdataset sample from whichever image member it has; ValueError if none."""
    for ext in IMAGE_EXTS:
        data = sample.get(ext)
        if isinstance(data, bytes | bytearray | memoryview):
            return decode_image(ext, bytes(data))
    raise ValueError(f"sample lacks an image member ({', '.join(IMAGE_EXTS)})")
