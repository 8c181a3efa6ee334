"""Image and volume readers for cohort cases: PNG/JPEG, DICOM files and series, NRRD/NIfTI, windowed and resized."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radpretrain import intensity
from radpretrain.errors import CohortError, DicomError
from radpretrain.shards.format import ROBUST_PERCENTILES

if TYPE_CHECKING:
    from radpretrain.data.cohorts import Case

#: 8-bit PNG/JPEG are already display-windowed; 16-bit PNG is not.
BITMAP_EXTS = (".png", ".jpg", ".jpeg")
#: Files read as 2D images (DICOM files too, or as volumes when multi-frame in a 3D cohort).
IMAGE_EXTS = (*BITMAP_EXTS, ".dcm", ".dicom")
#: Files read as 3D volumes; a folder of DICOM files is also a volume (one series).
VOLUME_EXTS = (".nrrd", ".nhdr", ".nii", ".nii.gz")


def extension(path: Path) -> str:
    """The lower-case file extension, `.nii.gz` as one."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def read_case(case: Case, spatial_dims: int, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode one case, check its mask fits, resize to `size` and window to [0, 1] (the shards' convention).

    Returns:
        The float32 image in [0, 1] of shape `size`, and the uint8 {0, 1} mask of the same shape (None
        for classification). Windowing: the DICOM header window, else 8-bit PNG/JPEG divided by 255 (they
        are display images already), else the robust 0.5-99.5 percentile range of the resized image.
    """
    pixels, window = _read_pixels(case, spatial_dims)
    mask = _read_mask(case, spatial_dims) if isinstance(case.target, Path) else None
    if mask is not None and mask.shape != pixels.shape:
        raise CohortError(
            f"case {case.id}: mask shape {mask.shape} differs from image shape {pixels.shape}; masks must "
            "match their image pixel for pixel"
        )
    image = _resize(pixels.astype(np.float32), size)
    if window is None:
        # Not apply_window: it floors the width at one stored unit, too wide for float volumes in [0, 1].
        low, high = np.percentile(image, ROBUST_PERCENTILES)
        image01 = np.clip((image - low) / max(float(high - low), 1e-6), 0.0, 1.0).astype(np.float32)
    else:
        image01 = intensity.apply_window(image, *window)
    resized_mask = None if mask is None else (_resize(mask.astype(np.float32), size) >= 0.5).astype(np.uint8)
    return image01, resized_mask


def _read_pixels(case: Case, spatial_dims: int) -> tuple[np.ndarray, tuple[float, float] | None]:
    path, ext = case.image, extension(case.image)
    if path.is_dir():
        return _read_series(case)
    if ext in BITMAP_EXTS:
        pixels = _read_bitmap(path, case.id, "image")
        return pixels, ((127.5, 255.0) if pixels.dtype == np.uint8 else None)
    if ext in VOLUME_EXTS:
        return _read_volume(path, case.id, "image"), None
    return _read_dicom_file(case, spatial_dims)


def _read_mask(case: Case, spatial_dims: int) -> np.ndarray:
    assert isinstance(case.target, Path)
    ext = extension(case.target)
    if spatial_dims == 2:
        if ext not in BITMAP_EXTS:
            raise CohortError(f"case {case.id}: 2D masks must be PNG (or JPEG) images")
        mask = _read_bitmap(case.target, case.id, "mask")
        # JPEG smears edges: threshold at half range instead of taking every non-zero value.
        return mask > (127 if ext != ".png" else 0)
    if ext not in VOLUME_EXTS:
        raise CohortError(f"case {case.id}: label volumes must be NRRD or NIfTI files")
    labels = _read_volume(case.target, case.id, "mask")
    return labels > 0.5 if labels.dtype.kind == "f" else labels != 0


def _read_bitmap(path: Path, case_id: str, what: str) -> np.ndarray:
    import cv2

    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise CohortError(f"case {case_id}: its {what} cannot be decoded as PNG/JPEG")
    if pixels.ndim == 3:  # colour files of grey content; alpha is dropped
        code = cv2.COLOR_BGRA2GRAY if pixels.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        pixels = cv2.cvtColor(pixels, code)
    return pixels


def _read_volume(path: Path, case_id: str, what: str) -> np.ndarray:
    """(D, H, W): NRRD in C order (slowest axis first), NIfTI's (i, j, k) reversed to (k, j, i)."""
    try:
        if extension(path) in (".nrrd", ".nhdr"):
            import nrrd

            data, _ = nrrd.read(str(path), index_order="C")
        else:
            import nibabel

            data = np.asanyarray(nibabel.load(str(path)).dataobj).T  # type: ignore[attr-defined]
    except Exception as exc:  # readers raise many types on damaged files; the case id is what helps
        raise CohortError(f"case {case_id}: its {what} volume cannot be read ({type(exc).__name__})") from None
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim != 3:
        raise CohortError(f"case {case_id}: its {what} has {data.ndim} dimensions; volumes must be 3D (one channel)")
    return np.ascontiguousarray(data)


def _read_dicom_file(case: Case, spatial_dims: int) -> tuple[np.ndarray, tuple[float, float] | None]:
    from radpretrain.shards.dicom import read_dicom, window_from_header

    try:
        ds, frames = read_dicom(case.image)
    except DicomError as exc:
        raise CohortError(f"case {case.id}: its DICOM image cannot be used ({exc})") from None
    if spatial_dims == 2 and frames.shape[0] != 1:
        raise CohortError(f"case {case.id}: multi-frame DICOM in a 2D cohort; give single-frame images")
    pixels = frames[0] if spatial_dims == 2 else frames
    return pixels, window_from_header(ds)


def _read_series(case: Case) -> tuple[np.ndarray, tuple[float, float] | None]:
    """One DICOM series folder -> (D, H, W), slices ordered along the slice normal (else InstanceNumber)."""
    from radpretrain.shards.dicom import read_dicom, window_from_header

    slices = []
    for path in sorted(p for p in case.image.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds, frames = read_dicom(path)
        except DicomError as exc:
            if str(exc) == "not a DICOM file":
                continue
            raise CohortError(f"case {case.id}: a slice of its DICOM series cannot be used ({exc})") from None
        slices.append((_slice_position(ds), ds, frames))
    if not slices:
        raise CohortError(f"case {case.id}: its series folder holds no DICOM images")
    if len({str(ds.get("SeriesInstanceUID", "")) for _, ds, _ in slices}) > 1:
        raise CohortError(f"case {case.id}: its folder holds several DICOM series; keep one series per folder")
    if len({frames.shape[1:] for _, _, frames in slices}) > 1:
        raise CohortError(f"case {case.id}: the slices of its DICOM series differ in size")
    slices.sort(key=lambda item: item[0])
    volume = np.concatenate([frames.astype(np.float32) for _, _, frames in slices])
    return volume, window_from_header(slices[0][1])


def _slice_position(ds: Any) -> float:
    try:
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        position = np.asarray(ds.ImagePositionPatient, dtype=float)
        return float(position @ np.cross(orientation[:3], orientation[3:]))
    except (AttributeError, ValueError, TypeError):
        return float(ds.get("InstanceNumber", 0) or 0)


def _resize(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Area averaging along the axes that shrink (as the shards' INTER_AREA), then linear along those that grow."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    shrunk = tuple(min(s, a) for s, a in zip(size, array.shape, strict=True))
    if shrunk != tuple(array.shape):
        tensor = torch.nn.functional.interpolate(tensor, size=shrunk, mode="area")
    if shrunk != tuple(size):
        mode = "bilinear" if array.ndim == 2 else "trilinear"
        tensor = torch.nn.functional.interpolate(tensor, size=tuple(size), mode=mode, align_corners=False)
    return tensor[0, 0].numpy()
