"""Image and volume readers for cohort cases: PNG/JPEG, DICOM files and series, NRRD/NIfTI, windowed and letterboxed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from radpretrain import intensity
from radpretrain.data import letterbox
from radpretrain.errors import CohortError, DicomError

if TYPE_CHECKING:
    from radpretrain.data.cohorts import Case


class CaseArrays(NamedTuple):
    """One decoded case at one size: the float32 image in [0, 1], the uint8 {0, 1} mask (None for
    classification) and the bool region holding the image rather than letterbox padding."""

    image01: np.ndarray
    mask: np.ndarray | None
    valid: np.ndarray


#: PNG/JPEG images (8 or 16 bits); windowed by their robust range like every image without a DICOM window.
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


def read_case(case: Case, spatial_dims: int, size: Sequence[int]) -> CaseArrays:
    """Decode one case, check its mask fits, window it and letterbox it to `size` as pretraining views are.

    Windowing follows `intensity.image_window`: the DICOM header window, else the robust range of the
    decoded pixels (8-bit PNG/JPEG too, as the shards do). The image is then `letterbox.fit` (aspect ratio
    kept in the image plane), windowed to [0, 1] and padded with `letterbox.FILL`; the mask is fitted,
    thresholded at 0.5 and padded with 0; `valid` marks the unpadded region that metrics score.
    """
    pixels, header_window = _read_pixels(case, spatial_dims)
    mask = _read_mask(case, spatial_dims) if isinstance(case.target, Path) else None
    if mask is not None and mask.shape != pixels.shape:
        raise CohortError(
            f"case {case.id}: mask shape {mask.shape} differs from image shape {pixels.shape}; masks must "
            "match their image pixel for pixel"
        )
    window = intensity.image_window(pixels, header_window)
    fitted = letterbox.fit(pixels.astype(np.float32), size)
    # image_window floors header windows at one unit and robust ones by dtype: no second floor here.
    image01, region = letterbox.pad(intensity.apply_window_(fitted, *window, intensity.FLOAT_MIN_WIDTH), size)
    resized_mask = None
    if mask is not None:
        resized_mask, _ = letterbox.pad((letterbox.fit(mask.astype(np.float32), size) >= 0.5).astype(np.uint8), size, 0)
    return CaseArrays(image01, resized_mask, letterbox.valid_mask(region, size))


def _read_pixels(case: Case, spatial_dims: int) -> tuple[np.ndarray, tuple[float, float] | None]:
    path, ext = case.image, extension(case.image)
    if path.is_dir():
        return _read_series(case)
    if ext in BITMAP_EXTS:
        return _read_bitmap(path, case.id, "image"), None
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
