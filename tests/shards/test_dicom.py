"""DICOM decoding on real test files: values, MONOCHROME1, frames, refusals with stable reasons, windows, resizing."""

from __future__ import annotations

import copy
import logging
import tracemalloc
import warnings
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, get_decoder, pixel_array

from radpretrain.errors import DicomError
from radpretrain.shards import dicom
from radpretrain.shards.dicom import (
    PLUGIN_ORDER,
    UnsupportedImage,
    decoding_plugins,
    modality_range,
    read_dicom,
    read_pixels,
    resize_longest,
    transfer_syntax_name,
    window_from_header,
)

# Monochrome files that pydicom decodes, covering every syntax family the archive may hold.
DECODABLE = [
    "RG1_UNCR.dcm",  # CR chest, MONOCHROME1, 15 bits stored
    "RG1_J2KR.dcm",  # the same, JPEG 2000 lossless
    "RG3_UNCR.dcm",  # CR extremity, MONOCHROME1, 10 bits stored
    "RG3_J2KR.dcm",
    "RG3_J2KI.dcm",  # JPEG 2000 lossy
    "693_UNCI.dcm",  # signed 14 bits with rescale
    "693_J2KR.dcm",
    "MR2_UNCR.dcm",  # non-integral rescale -> float64
    "CT_small.dcm",  # signed 16 bits, rescale widens to int32
    "JPEG-LL.dcm",  # JPEG lossless SV1
    "JPGLosslessP14SV1_1s_1f_8b.dcm",  # 8-bit JPEG lossless
    "JPGExtended.dcm",  # 12-bit JPEG extended (only pylibjpeg decodes it)
    "JPEG2000.dcm",
    "J2K_pixelrep_mismatch.dcm",  # codestream signedness disagrees with the header
    "JPEGLSNearLossless_16.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
    "emri_small.dcm",  # 10 frames
    "emri_small_big_endian.dcm",
    "emri_small_RLE.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "image_dfl.dcm",  # deflated explicit VR little endian, 8 bits
    "mlut_18.dcm",  # Modality LUT Sequence
    "vlut_04.dcm",  # VOI LUT Sequence
]


def data_file(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"{name} missing: install pydicom-data"
    return str(path)


def load(name: str) -> Dataset:
    return pydicom.dcmread(data_file(name))


def stored_range(ds: Dataset) -> tuple[int, int]:
    bits = ds.BitsStored
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2**bits - 1)


def reference(ds: Dataset) -> np.ndarray:
    """pydicom's own decode (its default plugin choice) + apply_modality_lut + the documented inversion."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = apply_modality_lut(pixel_array(ds), ds).astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        low, high = stored_range(ds)
        if "RescaleSlope" in ds:
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            low, high = sorted((low * slope + intercept, high * slope + intercept))
        values = (low + high) - values
    return values.reshape(-1, ds.Rows, ds.Columns)


@pytest.mark.parametrize("name", DECODABLE)
def test_pixels_equal_pydicom_modality_lut_exactly(name: str) -> None:
    _, ours = read_dicom(data_file(name))
    expected = reference(load(name))
    assert ours.shape == expected.shape
    assert ours.dtype.isnative
    assert np.array_equal(ours, expected)


def test_monochrome1_is_inverted_so_dense_tissue_is_bright() -> None:
    # RG1 is a PA chest stored MONOCHROME1: raw values are low where attenuation is high.
    ds = load("RG1_UNCR.dcm")
    raw = ds.pixel_array.astype(np.int64)
    ours = read_pixels(ds)[0].astype(np.int64)
    assert np.array_equal(ours, 32767 - raw)  # BitsStored 15, unsigned: max + min possible = 32767
    rows, cols = ours.shape
    band = slice(int(rows * 0.35), int(rows * 0.6))
    mediastinum = ours[band, int(cols * 0.46) : int(cols * 0.54)].mean()
    lungs = np.mean(
        [ours[band, int(cols * 0.2) : int(cols * 0.3)].mean(), ours[band, int(cols * 0.7) : int(cols * 0.8)].mean()]
    )
    assert mediastinum > lungs * 1.1
    assert raw[band, int(cols * 0.46) : int(cols * 0.54)].mean() < raw[band, int(cols * 0.2) : int(cols * 0.3)].mean()


def test_monochrome1_inversion_for_signed_rescaled_and_float_data() -> None:
    ds = load("MR_small.dcm")  # signed 16 bits stored, no rescale: low + high = -1
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert np.array_equal(read_pixels(ds)[0], -1 - ds.pixel_array.astype(np.int64))

    ds = load("MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, 3
    out = read_pixels(ds)[0]
    assert out.dtype == np.float64
    assert np.array_equal(out, (-32768 * 0.5 + 3 + 32767 * 0.5 + 3) - (ds.pixel_array * 0.5 + 3))

    # low + high does not fit the uint16 output: still exact.
    ds = load("RG1_UNCR.dcm")
    ds.RescaleSlope, ds.RescaleIntercept = 1, 30000
    out = read_pixels(ds)[0]
    assert modality_range(ds) == (30000.0, 62767.0)
    assert out.dtype == np.uint16
    assert np.array_equal(out, (30000 + 62767) - (ds.pixel_array.astype(np.int64) + 30000))


def test_codestream_values_beyond_bits_stored_are_clipped_before_inversion() -> None:
    # The J2K codestream holds 12-bit values but the header now says 8 bits: pydicom returns up to 467.
    ds = load("emri_small_jpeg_2k_lossless.dcm")
    raw = ds.pixel_array.astype(np.int64)
    ds.BitsStored, ds.HighBit, ds.PhotometricInterpretation = 8, 7, "MONOCHROME1"
    assert pixel_array(ds).max() > 255
    out = read_pixels(ds)
    assert out.dtype == np.uint16  # no wrap-around below zero
    assert np.array_equal(out, 255 - np.clip(raw, 0, 255))


def test_enhanced_multiframe_rescale_comes_from_functional_groups() -> None:
    ds = load("eCT_Supplemental.dcm")  # slope/intercept only in the shared functional groups
    assert "RescaleIntercept" not in ds
    out = read_pixels(ds)
    assert out.shape == (2, 512, 512)
    assert np.array_equal(out, ds.pixel_array.astype(np.int64) - 1024)


def test_frames_differing_in_rescale_are_refused() -> None:
    ds = load("eCT_Supplemental.dcm")
    shared = ds.SharedFunctionalGroupsSequence[0]
    transform = shared.PixelValueTransformationSequence
    del shared.PixelValueTransformationSequence
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item.PixelValueTransformationSequence = copy.deepcopy(transform)
        item.PixelValueTransformationSequence[0].RescaleIntercept = -1024 + i
    with pytest.raises(DicomError, match=r"^frames have different rescale$"):
        read_pixels(ds)


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_RLE.dcm"])
def test_frame_rules(name: str) -> None:
    ds = load(name)
    everything = reference(ds)
    assert everything.shape == (10, 64, 64)
    assert np.array_equal(read_pixels(ds, frame_rule="all"), everything)
    assert np.array_equal(read_pixels(ds, frame_rule="first"), everything[:1])
    assert np.array_equal(read_pixels(ds, frame_rule="middle"), everything[5:6])
    with pytest.raises(ValueError, match="frame_rule must be one of all, first, middle"):
        read_pixels(ds, frame_rule="last")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("SC_rgb.dcm", "colour image (photometric RGB)"),
        ("US1_J2KR.dcm", "colour image (photometric YBR_RCT)"),
        ("SC_ybr_full_uncompressed.dcm", "colour image (photometric YBR_FULL)"),
        ("OBXXXX1A.dcm", "colour image (photometric PALETTE COLOR)"),
        ("liver_1frame.dcm", "unsupported bit depth"),
        ("rtdose_1frame.dcm", "unsupported bit depth"),
    ],
)
def test_unsupported_images_are_skipped_with_a_reason(name: str, reason: str) -> None:
    with pytest.raises(UnsupportedImage) as caught:
        read_dicom(data_file(name))
    assert str(caught.value) == reason


def test_colour_reason_never_echoes_free_text() -> None:
    ds = load("MR_small.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom rightly warns that this is no CS value
        ds.PhotometricInterpretation = "Smith^John"
    with pytest.raises(UnsupportedImage, match=r"^colour image \(photometric other\)$"):
        read_pixels(ds)
    ds = load("MR_small.dcm")
    ds.SamplesPerPixel = 3
    with pytest.raises(UnsupportedImage, match=r"^colour image \(samples per pixel > 1\)$"):
        read_pixels(ds)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("rtplan.dcm", "no pixel data"),
        ("waveform_ecg.dcm", "no pixel data"),
        ("MR_truncated.dcm", "truncated pixel data"),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", "truncated file"),
        ("JPEG-lossy.dcm", "undecodable pixel data (JPEG Extended (Process 2 and 4))"),
        ("meta_missing_tsyntax.dcm", "missing transfer syntax"),
        ("no_meta.dcm", "not a DICOM file"),
    ],
)
def test_failures_have_stable_reasons(name: str, reason: str) -> None:
    with pytest.raises(DicomError) as caught:
        read_dicom(data_file(name))
    assert str(caught.value) == reason
    assert not isinstance(caught.value, UnsupportedImage)


@pytest.mark.parametrize("name", ["RG3_UNCR.dcm", "MR_small_RLE.dcm", "RG3_J2KR.dcm"])
@pytest.mark.parametrize("keep", [0.3, 0.7])
def test_files_cut_short_are_truncated_whatever_the_fraction(tmp_path: Path, name: str, keep: float) -> None:
    data = Path(data_file(name)).read_bytes()
    path = tmp_path / "Doe^John_19450101.dcm"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DicomError, match=r"^truncated (pixel data|file)$"):
        read_dicom(path)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_read_dicom_leaks_no_path_into_errors_logs_or_warnings(tmp_path: Path) -> None:
    data = Path(data_file("MR_small_RLE.dcm")).read_bytes()
    folder = tmp_path / "Doe^John"
    folder.mkdir()
    (folder / "cut.dcm").write_bytes(data[: len(data) // 2])
    (folder / "junk.dcm").write_bytes(b"not dicom at all")
    # What the CLI's logging.basicConfig would print: records reaching the root logger.
    root, records = logging.getLogger(), _Records()
    root.addHandler(records)
    level = root.level
    root.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as escaped:
            warnings.simplefilter("always")
            cases = [("cut.dcm", "truncated file"), ("junk.dcm", "not a DICOM file"), ("none.dcm", "unreadable file")]
            for name, reason in cases:
                with pytest.raises(DicomError) as caught:
                    read_dicom(folder / name)
                assert str(caught.value) == reason
    finally:
        root.removeHandler(records)
        root.setLevel(level)
    assert not escaped
    assert not [m for m in records.messages if "Doe" in m]
    # The same read without our module's precaution does log the path: the check above can fail.
    pydicom_log = logging.getLogger("pydicom")
    pydicom_level = pydicom_log.level  # deid.quiet_header_echo (run by other tests) raises it
    pydicom_log.propagate = True
    pydicom_log.setLevel(logging.DEBUG)
    root.addHandler(records)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom.dcmread(folder / "cut.dcm")
    finally:
        root.removeHandler(records)
        pydicom_log.propagate = False
        pydicom_log.setLevel(pydicom_level)
    assert [m for m in records.messages if "Doe" in m]


def test_absurd_dimensions_are_refused_before_any_allocation() -> None:
    cases = []
    ds = load("MR_small.dcm")
    ds.Rows, ds.Columns = 60000, 60000  # 7.2 GB declared, 8 KB present, over the cap
    cases.append(ds)
    ds = load("MR_small.dcm")
    ds.Rows = 64 * 40  # under the cap but 40x the bytes present
    cases.append(ds)
    ds = load("MR_small.dcm")
    ds.NumberOfFrames = 1000
    cases.append(ds)
    ds = load("emri_small_jpeg_2k_lossless.dcm")
    ds.Rows, ds.Columns = 8000, 8000  # 10 frames x 128 MB claimed from 40 KB of codestream
    cases.append(ds)
    for ds in cases:
        tracemalloc.start()
        try:
            with pytest.raises(DicomError) as caught:
                read_pixels(ds, frame_rule="all")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert str(caught.value) == "absurd dimensions"
        assert peak < 4 * 2**20
        assert str(ds.Rows) not in str(caught.value)


def test_pixel_cap_is_adjustable_and_counts_only_kept_frames() -> None:
    ds = load("emri_small.dcm")  # 10 frames of 64 x 64
    with pytest.raises(DicomError, match=r"^absurd dimensions$"):
        read_pixels(ds, max_pixels=64 * 64 * 9)
    assert read_pixels(ds, frame_rule="first", max_pixels=64 * 64).shape == (1, 64, 64)


def test_slightly_short_native_data_is_truncated_not_absurd() -> None:
    ds = load("MR_small.dcm")
    ds.PixelData = ds.PixelData[: -64 * 2 * 5]  # five rows missing
    with pytest.raises(DicomError, match=r"^truncated pixel data$"):
        read_pixels(ds)
    del ds.PixelData
    with pytest.raises(DicomError, match=r"^no pixel data$"):
        read_pixels(ds)


def test_undecodable_and_unknown_transfer_syntaxes() -> None:
    ds = load("MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    with pytest.raises(DicomError, match=r"^undecodable transfer syntax MPEG2 Main Profile / Main Level$"):
        read_pixels(ds)
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.99.1"  # a private syntax: its UID is not echoed
    with pytest.raises(DicomError, match=r"^undecodable transfer syntax unknown$"):
        read_pixels(ds)
    assert transfer_syntax_name(ds) == "unknown"
    assert transfer_syntax_name(load("RG1_J2KR.dcm")) == "JPEG 2000 Image Compression (Lossless Only)"


def test_plugin_table_names_real_plugins_in_measured_order() -> None:
    for tsyntax, order in PLUGIN_ORDER.items():
        available = get_decoder(tsyntax).available_plugins
        assert set(order) <= set(available), f"{tsyntax.name}: {order} vs installed {available}"
        assert decoding_plugins(tsyntax)[: len(order)] == order
    assert decoding_plugins(uid.ExplicitVRLittleEndian) == ("",)
    assert decoding_plugins(uid.JPEGLSLossless)[0] == "pyjpegls"
    assert decoding_plugins(uid.RLELossless)[0] == "pylibjpeg"


def test_a_failing_plugin_hands_over_to_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow cannot decode 12-bit JPEG Extended; put it first and the next plugin must still give the pixels.
    monkeypatch.setitem(PLUGIN_ORDER, uid.JPEGExtended12Bit, ("pillow", "gdcm", "pylibjpeg"))
    decoding_plugins.cache_clear()
    try:
        assert decoding_plugins(uid.JPEGExtended12Bit)[0] == "pillow"
        ds = load("JPGExtended.dcm")
        with pytest.raises(Exception, match="Pillow does not support"):
            pixel_array(ds, decoding_plugin="pillow")
        assert np.array_equal(read_pixels(ds), reference(ds))
    finally:
        monkeypatch.undo()
        decoding_plugins.cache_clear()


def test_modality_range() -> None:
    assert modality_range(load("RG1_UNCR.dcm")) == (0.0, 32767.0)
    assert modality_range(load("CT_small.dcm")) == (-33792.0, 31743.0)  # signed 16 bits, intercept -1024
    ds = load("CT_small.dcm")
    ds.RescaleSlope = -2
    assert modality_range(ds) == (32767 * -2 - 1024.0, -32768 * -2 - 1024.0)
    assert modality_range(load("mlut_18.dcm")) == (0.0, 65535.0)


def test_window_from_header() -> None:
    assert window_from_header(load("MR_small.dcm")) == (600.0, 1600.0)
    assert window_from_header(load("bad_sequence.dcm")) == (40.0, 350.0)  # first of several windows
    # MONOCHROME1: the centre moves with the inversion (0 + 32767 - 15000), the width stays.
    assert window_from_header(load("RG1_UNCR.dcm")) == (17767.0, 30000.0)
    assert window_from_header(load("emri_small.dcm")) is None
    ds = load("MR_small.dcm")
    ds.WindowWidth = 0
    assert window_from_header(ds) is None


def test_window_from_voi_lut_sequence() -> None:
    ds = load("MR_small.dcm")
    del ds.WindowCenter, ds.WindowWidth
    item = Dataset()
    item.LUTDescriptor = [1024, -200, 16]
    # Flat, then a ramp over inputs -100..99, then flat: the window is that ramp.
    item.LUTData = [int(v) for v in np.clip(np.arange(1024) - 100, 0, 200) * 300]
    ds.VOILUTSequence = [item]
    assert window_from_header(ds) == (0.0, 201.0)
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert window_from_header(ds) == (-1.0, 201.0)


def test_resize_longest_keeps_dtype_and_16_bit_values() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(30000, 60000, size=(100, 80), dtype=np.uint16)
    small = resize_longest(img, 32)
    assert small.shape == (32, 26) and small.dtype == np.uint16
    expected = cv2.resize(img.astype(np.float32), (26, 32), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(np.float32) - expected).max() <= 0.5 + 1e-3
    assert small.min() > 30000
    wide = resize_longest(img.T, 32)
    assert wide.shape == (26, 32)
    assert resize_longest(img, 100) is img  # never upscales
    assert resize_longest(img, 500) is img


@pytest.mark.parametrize("shape", [(2500, 2000), (2503, 2001)])
def test_resize_longest_large_factors_stay_close_to_one_step_area(shape: tuple[int, int]) -> None:
    # A ramp with a sharp 400-level step, plus white noise, shrunk ~4.9x: the two-step path (k = 2 first)
    # keeps the shape, the noise level, the step's place (trimming an odd side moves it < 0.15 of the step
    # at one column) and stays within half the output noise of a one-step INTER_AREA.
    rng = np.random.default_rng(0)
    rows, cols = shape
    ramp = np.linspace(500, 3500, cols, dtype=np.float32)[None, :].repeat(rows, 0)
    ramp[:, 1200:] += 400
    noisy = np.clip(ramp + rng.normal(0, 40, shape), 0, 4095).astype(np.uint16)
    target = (round(cols * 512 / rows), 512)
    small = resize_longest(noisy, 512)
    assert small.shape == (target[1], target[0]) and small.dtype == np.uint16
    clean_one = cv2.resize(ramp, target, interpolation=cv2.INTER_AREA)
    clean_two = resize_longest(ramp, 512)
    noise_one = cv2.resize(noisy, target, interpolation=cv2.INTER_AREA) - clean_one
    noise_two = small - clean_two
    assert 0.85 < noise_two.std() / noise_one.std() < 1.15
    assert np.abs(noise_two - noise_one).mean() < 0.5 * noise_one.std()
    step = np.argmax(np.diff(clean_one.mean(axis=0)))
    assert np.argmax(np.diff(clean_two.mean(axis=0))) == step
    away = np.ones(target[0], bool)
    away[step - 1 : step + 3] = False
    assert np.abs(clean_two - clean_one)[:, away].max() < 2.0  # the ramp climbs 1.5 per source column
    assert np.abs(clean_two - clean_one).max() < 0.15 * 400
    assert np.all(resize_longest(np.full(shape, 777, np.uint16), 512) == 777)


def test_resize_longest_handles_wide_integers_and_frames() -> None:
    img = np.full((90, 60), 70000, dtype=np.int32)
    img[:45] = -5000
    small = resize_longest(img, 30)
    assert small.dtype == np.int32 and small.shape == (30, 20)
    assert small[0, 0] == -5000 and small[-1, -1] == 70000
    frames = np.stack([img, img])
    assert resize_longest(frames, 30).shape == (2, 30, 20)
    signed = np.full((64, 64), -1234, dtype=np.int16)
    assert np.all(resize_longest(signed, 16) == -1234)
    with pytest.raises(ValueError, match="size must be >= 1"):
        resize_longest(img, 0)


def test_pydicom_logger_does_not_reach_the_root_logger() -> None:
    assert logging.getLogger("pydicom").propagate is False
    assert dicom.FRAME_RULES == ("all", "first", "middle")
