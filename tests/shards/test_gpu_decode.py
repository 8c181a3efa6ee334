"""GPU decoding (nvImageCodec): the --decoder choice, the codec step's values, shards identical to the CPU's.

Where there is no GPU, nvImageCodec's own CPU codecs (`gpu_decode.NVIMGCODEC_CPU`, installed with .[dev]) run the
GPU path's code: frames out of the DICOM file, the decoder per worker process, dtype and shape checks, the CPU
fallback and the manifest. Whether nvJPEG2000 on a GPU gives the same integers is tested only where a GPU answers.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import RLELossless

from radpretrain import synth
from radpretrain.cli import main
from radpretrain.shards import dicom, gpu_decode
from radpretrain.shards.gpu_decode import GPU, NVIMGCODEC_CPU, NvDecoder
from radpretrain.shards.plan import ShardConfig
from radpretrain.shards.run import shard
from radpretrain.synth.archive import transcode
from tests.bad_input.helpers import refused
from tests.shards.helpers import make_j2k, make_radiograph

SIZE = 48
NO_NVIMGCODEC = gpu_decode.unavailable(NVIMGCODEC_CPU)
NO_GPU = gpu_decode.unavailable(GPU)
needs_nvimgcodec = pytest.mark.skipif(
    NO_NVIMGCODEC is not None, reason=f"{NO_NVIMGCODEC}: pip install -e '.[dev]' (or 'radpretrain[gpu]')"
)
needs_gpu = pytest.mark.skipif(
    NO_GPU is not None, reason=f"GPU decoding cannot run here ({NO_GPU}): nvJPEG2000's values are unverified"
)
without_gpu = pytest.mark.skipif(NO_GPU is None, reason="a GPU decodes here: the no-GPU behaviour cannot be seen")


def _radiographs(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "synth.json")


@pytest.fixture(scope="module")
def j2k_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Lossless JPEG 2000 radiographs at 8, 12 and 16 bits stored (synth mixes MONOCHROME1, rescale, signed)."""
    archives = {}
    for bits in (8, 12, 16):
        root = tmp_path_factory.mktemp(f"j2k{bits}") / "src"
        synth.generate(
            root, 6, seed=bits, shape=(128, 96), bits_stored=bits, syntaxes=["JPEG2000Lossless"], progress=False
        )
        archives[bits] = root
    return archives


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.tar"))}


# The choice.


@without_gpu
def test_decoder_gpu_without_a_gpu_is_refused_in_one_line_naming_the_fix(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    make_radiograph(tmp_path / "src" / "a.dcm", "P1")
    out, key = tmp_path / "out", tmp_path / "keys" / "k"
    message = refused(capsys, "shard", tmp_path / "src", out, "--key", key, "--decoder", "gpu", "--no-progress")
    assert message.startswith("--decoder gpu needs NVIDIA nvImageCodec and a CUDA GPU (")
    assert "pip install 'radpretrain[gpu]' on a machine with a CUDA GPU, or use --decoder cpu" in message
    assert not out.exists() and not key.exists()  # refused before any work


@without_gpu
def test_auto_takes_the_cpu_without_a_gpu_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_j2k(tmp_path / "src" / "a.dcm")
    with caplog.at_level(logging.INFO, logger="radpretrain.shards.gpu_decode"):
        summary = shard(
            tmp_path / "src",
            tmp_path / "out",
            ShardConfig(size=SIZE),
            key=tmp_path / "k",
            decoder="auto",
            progress=False,
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "radpretrain.shards.gpu_decode"]
    assert lines == [f"decoder: CPU (no GPU decoding: {NO_GPU})"]
    assert summary.manifest is not None and summary.manifest["decode"]["files"] == {"j2k-reduce-2": 1}


def test_cli_choices_are_the_decoders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["shard", str(tmp_path), str(tmp_path / "out"), "--decoder", "cuda"])
    choices = ", ".join(repr(decoder) for decoder in gpu_decode.DECODERS)
    assert f"argument --decoder: invalid choice: 'cuda' (choose from {choices})" in capsys.readouterr().err


# The codec step.


@needs_nvimgcodec
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_nvimgcodec_gives_the_values_of_the_cpu_plugins(j2k_archives: dict[int, Path], bits: int) -> None:
    decoder = NvDecoder(NVIMGCODEC_CPU)
    for path in _radiographs(j2k_archives[bits]):
        ds, full = dicom.read_dicom(path)
        decoded = dicom.read_dicom_for(path, SIZE, decoder=decoder)
        assert decoded.path == (NVIMGCODEC_CPU if ds.PixelRepresentation == 0 else dicom.FULL_DECODE)
        assert decoded.frames.dtype == full.dtype and decoded.shape == full.shape[1:]
        np.testing.assert_array_equal(decoded.frames, full)


@needs_nvimgcodec
def test_baseline_jpeg_through_nvimgcodec_in_full(tmp_path: Path) -> None:
    synth.generate(tmp_path / "src", 3, seed=1, shape=(256, 192), bits_stored=8, syntaxes=["ExplicitVRLittleEndian"])
    decoder = NvDecoder(NVIMGCODEC_CPU)
    for number, path in enumerate(_radiographs(tmp_path / "src")):
        out = tmp_path / f"jpeg{number}.dcm"
        transcode(path, out, "JPEGBaseline8Bit")
        decoded = dicom.read_dicom_for(out, SIZE, decoder=decoder)
        assert decoded.path == NVIMGCODEC_CPU and decoded.shape == (256, 192)  # in full, not DCT-scaled
        full = dicom.read_dicom(out)[1]
        assert decoded.frames.dtype == full.dtype
        # Lossy: decoders may round the inverse DCT differently (libjpeg-turbo on both sides here: equal).
        assert np.abs(decoded.frames.astype(np.int32) - full).max() <= 1


@needs_nvimgcodec
@pytest.mark.parametrize("case", ["signed", "rle", "multi-frame", "damaged"])
def test_what_nvimgcodec_does_not_take_goes_the_cpu_way(tmp_path: Path, case: str) -> None:
    path = tmp_path / "a.dcm"
    expected_path = dicom.FULL_DECODE
    if case == "signed":  # pydicom corrects the sign of J2K codestreams; the GPU path leaves them to it
        make_j2k(path, signed=True)
    elif case == "rle":
        ds = make_radiograph(path, "P1", shape=(256, 192))
        ds.compress(RLELossless, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
    elif case == "multi-frame":  # every frame through nvImageCodec in one batch
        make_j2k(path, frames=3)
        expected_path = NVIMGCODEC_CPU
    else:  # a codestream cut short: nvImageCodec fails, and the CPU plugins give their own verdict
        make_j2k(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 3000] + data[-8:])
    decoder = NvDecoder(NVIMGCODEC_CPU)
    try:
        expected = dicom.read_dicom(path)[1]
    except dicom.DicomError as exc:
        with pytest.raises(dicom.DicomError, match=re.escape(str(exc))):
            dicom.read_dicom_for(path, SIZE, decoder=decoder)
        return
    decoded = dicom.read_dicom_for(path, SIZE, decoder=decoder)
    assert decoded.path == expected_path
    np.testing.assert_array_equal(decoded.frames, expected)


@needs_nvimgcodec
def test_shards_from_nvimgcodec_are_byte_identical_to_the_cpus_exact_decode(
    j2k_archives: dict[int, Path], tmp_path: Path
) -> None:
    key, src = tmp_path / "k", j2k_archives[12]
    cpu = shard(src, tmp_path / "cpu", ShardConfig(size=SIZE, shard_size=2, exact_decode=True), key=key, progress=False)
    # Two workers, each with its own decoder, and the default (not exact) decode: nvImageCodec decodes in full.
    nv = shard(
        src,
        tmp_path / "nv",
        ShardConfig(size=SIZE, shard_size=2),
        key=key,
        workers=2,
        decoder=NVIMGCODEC_CPU,
        progress=False,
    )
    assert cpu.manifest is not None and nv.manifest is not None
    signed = sum(dicom.read_dicom(path)[0].PixelRepresentation for path in _radiographs(src))
    written = nv.manifest["counts"]["written"]
    assert nv.manifest["decode"]["files"] == {NVIMGCODEC_CPU: written - signed, **({"full": signed} if signed else {})}
    assert cpu.manifest["decode"]["files"] == {"full": written}
    assert _shard_bytes(tmp_path / "nv") == _shard_bytes(tmp_path / "cpu") != {}


@needs_nvimgcodec
@without_gpu
def test_a_worker_that_cannot_start_the_gpu_decoder_decodes_on_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    gpu_decode._DECODERS.pop(GPU, None)
    with caplog.at_level(logging.WARNING, logger="radpretrain.shards.gpu_decode"):
        assert gpu_decode.process_decoder(GPU) is None  # nvImageCodec is here, a GPU is not
    assert "could not start nvImageCodec (RuntimeError); it decodes on the CPU" in caplog.text
    gpu_decode._DECODERS.pop(GPU, None)


# On a GPU.


@needs_gpu
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_gpu_decode_is_exact_for_lossless_jpeg_2000(j2k_archives: dict[int, Path], bits: int) -> None:
    decoder = gpu_decode.process_decoder(GPU)
    assert decoder is not None
    for path in _radiographs(j2k_archives[bits]):
        ds, full = dicom.read_dicom(path)
        decoded = dicom.read_dicom_for(path, SIZE, decoder=decoder)
        assert decoded.path == (GPU if ds.PixelRepresentation == 0 else dicom.FULL_DECODE)
        np.testing.assert_array_equal(decoded.frames, full)


@needs_gpu
def test_gpu_shards_are_byte_identical_to_the_cpus_exact_decode(j2k_archives: dict[int, Path], tmp_path: Path) -> None:
    key, src = tmp_path / "k", j2k_archives[16]
    cpu = shard(
        src, tmp_path / "cpu", ShardConfig(size=SIZE, exact_decode=True), key=key, decoder="cpu", progress=False
    )
    gpu = shard(src, tmp_path / "gpu", ShardConfig(size=SIZE), key=key, workers=2, decoder="auto", progress=False)
    assert cpu.manifest is not None and gpu.manifest is not None
    assert gpu.manifest["decode"]["files"].get(GPU, 0) > 0
    assert _shard_bytes(tmp_path / "gpu") == _shard_bytes(tmp_path / "cpu") != {}
    manifest = json.loads((tmp_path / "gpu" / "manifest.json").read_text())
    assert manifest["decode"]["exact"] is False  # the setting; the files' paths say they were decoded in full
