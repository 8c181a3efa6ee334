"""One source file -> its samples: decode, resize, stored values, the sample's json and key."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from radpretrain import intensity
from radpretrain.shards import deid
from radpretrain.shards.codecs import CODECS
from radpretrain.shards.format import ROBUST_PERCENTILES, SCHEMA_VERSION

#: Frames a multi-frame file gives: "all" (every frame a sample), "first" or "middle".
FRAME_RULE = "all"


class SkipFile(Exception):
    """A file that is fine but not used (colour, policy); `reason` is a fixed phrase."""


@dataclass
class WriterSettings:
    """What every worker needs; pickled once per worker process."""

    src: str
    out: str
    size: int
    fingerprint: str
    age_buckets: list[str]
    frame_rule: str = FRAME_RULE
    vocab: dict[str, list[str]] = field(default_factory=dict)
    codec: str = "png"
    #: Decode every file in full (today's pixels exactly) instead of at the resolution stored (`dicom.read_dicom_for`).
    exact_decode: bool = False
    #: Burned-in text screening (`shards.ocr.TextScreen`); None when --scan-text is off.
    text: Any = None
    #: The run's decoder, resolved in the parent (`gpu_decode.resolve`): "cpu", or "gpu" (nvImageCodec decodes
    #: JPEG 2000 / HTJ2K / baseline JPEG in full; each worker process makes its own decoder).
    decoder: str = "cpu"


def stored_pixels(image: np.ndarray) -> tuple[np.ndarray, int]:
    """Modality-LUT values -> (uint16 image, offset) with stored = round(value - offset)."""
    low, high = float(np.min(image)), float(np.max(image))
    offset = 0 if low >= 0 and high <= 65535 else int(np.floor(low))
    shifted = np.rint(image.astype(np.float64) - offset) if image.dtype.kind == "f" else image.astype(np.int64) - offset
    return np.clip(shifted, 0, 65535).astype(np.uint16), offset


#: Largest pixel count whose histogram OpenCV counts exactly (its bins are float32: integers up to 2^24).
_CV_HIST_PIXELS = 2**24


def robust_range(stored: np.ndarray, percentiles: tuple[float, float] = ROBUST_PERCENTILES) -> tuple[float, float]:
    """np.percentile(stored, percentiles) (linear interpolation) of a uint16 image from its histogram: the same
    values, 30x faster on a 512 px image (0.085 ms instead of 2.5) than the partition np.percentile does.

    The histogram is OpenCV's (one bin per value up to the maximum): 0.085 ms against 0.29 for np.bincount,
    which first copies the pixels to int64; images over 2^24 pixels use np.bincount (float32 bins)."""
    if stored.size <= _CV_HIST_PIXELS:
        top = int(stored.max()) + 1
        counts = cv2.calcHist([np.ascontiguousarray(stored).reshape(1, -1)], [0], None, [top], [0, top]).ravel()
        cumulative = np.cumsum(counts, dtype=np.int64)
    else:
        cumulative = np.cumsum(np.bincount(stored.ravel()))
    last = int(cumulative[-1]) - 1

    def order_statistic(rank: int) -> int:  # the rank-th smallest value, counting from 0
        return int(np.searchsorted(cumulative, rank, side="right"))

    ends = []
    for percentile in percentiles:
        position = last * percentile / 100.0
        below = math.floor(position)
        low, high = order_statistic(below), order_statistic(min(below + 1, last))
        ends.append(low + (high - low) * (position - below))
    return ends[0], ends[1]


def sample_meta(
    row: dict[str, Any],
    split: str,
    stored: np.ndarray,
    offset: int,
    original_shape: tuple[int, int],
    spacing: tuple[float, float] | None,
    window: tuple[float, float] | None,
) -> dict[str, Any]:
    """The json of one sample: derived index fields + what the pixels say, all in stored units."""
    low, high = robust_range(stored)
    if window is None:  # the robust range is in stored units already
        center, width = intensity.range_window(low, high)
    else:
        center, width = window[0] - offset, window[1]
    scale_r, scale_c = original_shape[0] / stored.shape[0], original_shape[1] / stored.shape[1]
    meta = {
        "schema_version": SCHEMA_VERSION,
        "patient": row["patient"],
        "study": row.get("study"),
        "split": split,
        "body_part": row["body_part"],
        "age_years": row.get("age_years"),
        "age_bucket": row.get("age_bucket"),
        "sex": row.get("sex"),
        "view": row.get("view"),
        "laterality": row.get("laterality"),
        "modality": row.get("modality"),
        "manufacturer": row.get("manufacturer"),
        "spacing_mm": None if spacing is None else [round(spacing[0] * scale_r, 6), round(spacing[1] * scale_c, 6)],
        "original_shape": [int(original_shape[0]), int(original_shape[1])],
        "window_center": round(float(center), 4),
        "window_width": round(float(width), 4),
        "intensity_low": round(low, 4),
        "intensity_high": round(high, 4),
        "offset": int(offset),
        "bits_stored": row.get("bits_stored"),
        "transfer_syntax": row.get("transfer_syntax") or "unknown",
    }
    return meta


def pixel_spacing(ds: Any) -> tuple[float, float] | None:
    """(row, column) mm per pixel from PixelSpacing, else ImagerPixelSpacing; None when neither is plausible."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword)
            if value is not None and len(value) == 2:
                row_mm, col_mm = float(value[0]), float(value[1])
                if 0 < row_mm < 100 and 0 < col_mm < 100:
                    return row_mm, col_mm
        except (TypeError, ValueError):
            continue
    return None


def frame_key(sop_key: str, frame: int, frames: int) -> str:
    """The sample key: the SOP pseudonym, or for frame f of a multi-frame file a hash of it and f."""
    if frames == 1:
        return sop_key
    return hashlib.sha256(f"{sop_key}:{frame}".encode()).hexdigest()[: deid.PSEUDONYM_CHARS]


def file_samples(
    path: Path, row: dict[str, Any], split: str, settings: WriterSettings
) -> tuple[list[dict[str, Any]], str]:
    """Decode one file and return its samples and its decode path (`dicom.Decoded.path`); SkipFile /
    DicomError / ShardError say why there are none."""
    from radpretrain.shards import dicom, gpu_decode, plain

    window: tuple[float, float] | None = None
    spacing: tuple[float, float] | None = None
    shape: tuple[int, int] | None = None
    decode_path = dicom.FULL_DECODE
    burned_flag = None  # BurnedInAnnotation: the text screen skips images whose header decides
    if row["kind"] == "image":
        try:
            frames = plain.read_grey(path)[None]
        except plain.SkippedImage as exc:
            raise SkipFile(str(exc)) from None
        bits = 8 if frames.dtype == np.uint8 else 16
        row = {**row, "bits_stored": bits}
    else:
        try:
            decoded = dicom.read_dicom_for(
                path,
                None if settings.exact_decode else settings.size,
                frame_rule=settings.frame_rule,  # type: ignore[arg-type]
                decoder=gpu_decode.process_decoder(settings.decoder),
            )
        except dicom.UnsupportedImage as exc:
            raise SkipFile(str(exc)) from None
        ds, frames, shape, decode_path = decoded
        window = dicom.window_from_header(ds)
        spacing = pixel_spacing(ds)
        burned_flag = ds.get("BurnedInAnnotation")
    samples = []
    count = len(frames)
    for number, frame in enumerate(frames):
        original = shape or frame.shape
        resized = dicom.resize_longest(frame, settings.size, shape=original)
        stored, offset = stored_pixels(resized)
        if settings.text is not None:  # raises SkipFile when the pixels carry text that is not allowed
            settings.text.screen(stored, row["file"], number, burned_flag)
        meta = sample_meta(row, split, stored, offset, original, spacing, window)
        deid.check_sample_meta(meta, settings.vocab)
        samples.append(
            {
                "__key__": frame_key(row["sop"], number, count),
                CODECS[settings.codec].ext: CODECS[settings.codec].encode(stored),
                "json": json.dumps(meta, separators=(",", ":")).encode(),
            }
        )
    return samples, decode_path
