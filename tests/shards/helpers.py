"""Small pydicom-made radiographs for unit tests of the sharder (the end-to-end tests use the synth generator)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def make_radiograph(
    path: Path,
    patient: str,
    *,
    seed: int = 0,
    shape: tuple[int, int] = (96, 80),
    modality: str = "CR",
    body_part: str = "CHEST",
    age: str | None = "045Y",
    sex: str = "F",
    view: str = "PA",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    sop: str | None = None,
    burned_in: str | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
) -> Dataset:
    """Write one little-endian radiograph with a smooth gradient plus noise; returns the dataset."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient
    ds.PatientName = f"DOE^{patient}"
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    if age is not None:
        ds.PatientAge = age
    ds.PatientSex = sex
    ds.ViewPosition = view
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.ImagerPixelSpacing = [0.2, 0.2]
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    top = 2**bits_stored - 1
    ramp = np.linspace(0.1, 0.9, rows)[:, None] * np.ones((1, cols))
    pixels = np.clip(ramp * top + rng.normal(0, top * 0.02, (rows, cols)), 0, top).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def make_archive(root: Path, n: int, patients: int = 5, shape: tuple[int, int] = (96, 80)) -> list[Dataset]:
    """n radiographs of `patients` patients in patient/image folders, body parts cycling chest/hand/knee."""
    parts = ("CHEST", "HAND", "KNEE")
    return [
        make_radiograph(
            root / f"PAT{i % patients}" / f"img{i:03d}.dcm",
            f"PAT{i % patients}",
            seed=i,
            shape=shape,
            body_part=parts[i % 3],
        )
        for i in range(n)
    ]


def make_j2k(path: Path, *, shape: tuple[int, int] = (256, 192), signed: bool = False, frames: int = 1) -> Path:
    """`make_radiograph` as 12-bit lossless JPEG 2000 (pydicom's encoder), optionally signed or multi-frame."""
    ds = make_radiograph(path, "P1", shape=shape)
    pixels = ds.pixel_array
    if signed:
        ds.PixelRepresentation = 1
        pixels = (pixels.astype(np.int32) - 2048).astype(np.int16)
    if frames > 1:
        ds.NumberOfFrames = frames
        pixels = np.stack([pixels] * frames)
    ds.compress(JPEG2000Lossless, pixels, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path
