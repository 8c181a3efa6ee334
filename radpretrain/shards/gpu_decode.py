"""JPEG 2000, HTJ2K and baseline JPEG pixel data decoded by NVIDIA nvImageCodec on a CUDA GPU (the [gpu] extra)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from functools import cache
from typing import Any

import numpy as np
from pydicom import uid

from radpretrain.errors import ConfigError

log = logging.getLogger(__name__)

#: `radpretrain shard --decoder`. auto: nvImageCodec on the GPU when the [gpu] extra is installed and a CUDA GPU
#: decodes a test image exactly, else the CPU plugins (one log line says which); cpu: the CPU plugins always;
#: gpu: nvImageCodec, or a ConfigError that says what is missing.
DECODERS = ("auto", "cpu", "gpu")
CPU, GPU = "cpu", "gpu"
#: nvImageCodec on its own CPU codecs (OpenJPEG, libjpeg-turbo): the GPU path's code, run where there is no GPU,
#: by the tests and bench/shard.py. Not a command-line choice.
NVIMGCODEC_CPU = "nvimgcodec-cpu"

#: What nvImageCodec decodes (nvJPEG2000: JPEG 2000 and HTJ2K; nvJPEG: baseline JPEG). It has no reduced-resolution
#: decode, so these are decoded in full and area-resized: the pixels of `--exact-decode`, not of the CPU's default
#: wavelet-level / DCT-scaled decode. A frame it cannot decode goes the CPU way (the manifest counts the path taken).
SYNTAXES = frozenset(
    (uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K, uid.JPEGBaseline8Bit)
)
#: Lossless codestreams decode to the same integers in every conforming decoder (reversible 5/3 wavelet), so their
#: shards are byte-identical to the CPU's with `--exact-decode`; lossy ones (9/7 wavelet, DCT) differ by rounding.
LOSSLESS = frozenset((uid.JPEG2000Lossless, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL))

INSTALL_HINT = "pip install 'radpretrain[gpu]'"


class NvDecoder:
    """One process's nvImageCodec decoder (`dicom.FrameDecoder`): encapsulated frames -> stored values.

    `backend` GPU uses the GPU decoders only (nvJPEG2000, nvJPEG, the hardware JPEG engine), never nvImageCodec's
    CPU codecs, so a file counted as "gpu" was decoded on the GPU; NVIMGCODEC_CPU uses only those CPU codecs. One
    host thread: the parallelism comes from the worker processes, each with its own decoder (`process_decoder`).
    """

    syntaxes = SYNTAXES

    def __init__(self, backend: str = GPU) -> None:
        nvimgcodec = _import()
        if backend == GPU:
            kind = nvimgcodec.BackendKind
            kinds: tuple[Any, ...] = (kind.HW_GPU_ONLY, kind.GPU_ONLY, kind.HYBRID_CPU_GPU)
            options: dict[str, Any] = {}
        elif backend == NVIMGCODEC_CPU:
            kinds = (nvimgcodec.BackendKind.CPU_ONLY,)
            options = {"device_id": nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY}
        else:
            raise ValueError(f"backend must be {GPU!r} or {NVIMGCODEC_CPU!r}, got {backend!r}")
        with _quiet_stderr():
            self._decoder = nvimgcodec.Decoder(
                max_num_cpu_threads=1, backends=[nvimgcodec.Backend(kind) for kind in kinds], **options
            )
        self._params = nvimgcodec.DecodeParams(
            allow_any_depth=True, color_spec=nvimgcodec.ColorSpec.UNCHANGED, apply_exif_orientation=False
        )
        self._codestream = nvimgcodec.CodeStream
        #: The decode path the manifest counts for files decoded here.
        self.path = backend

    def decode(self, frames: list[bytes], rows: int, cols: int, dtype: np.dtype) -> np.ndarray | None:
        """(len(frames), rows, cols) values of `dtype`, or None unless every frame decodes to one unsigned channel
        of that shape and a depth `dtype` holds (the caller then decodes the file on the CPU)."""
        try:
            with _quiet_stderr():  # a frame it cannot decode is a warning line on stderr; the CPU path decides
                images = self._decoder.decode([self._codestream(frame) for frame in frames], params=self._params)
        except Exception:  # nvImageCodec raises on codestreams it cannot parse
            return None
        out = np.empty((len(frames), rows, cols), dtype)
        for number, image in enumerate(images):
            if image is None:
                return None
            pixels = np.asarray(image.cpu())  # device memory -> host (a host image is returned as it is)
            if pixels.ndim == 3 and pixels.shape[2] == 1:
                pixels = pixels[..., 0]
            if pixels.shape != (rows, cols) or pixels.dtype.kind != "u" or pixels.dtype.itemsize > out.itemsize:
                return None
            out[number] = pixels
        return out


# Each process makes its own decoder on first use (a CUDA context cannot cross a process boundary).
_DECODERS: dict[str, NvDecoder | None] = {}


def process_decoder(decoder: str) -> NvDecoder | None:
    """This process's decoder for a run's decoder (`resolve`): None for CPU. A worker that cannot start
    nvImageCodec (the parent could) logs it once and decodes on the CPU; the manifest's decode paths show it."""
    if decoder == CPU:
        return None
    if decoder not in _DECODERS:
        try:
            _DECODERS[decoder] = NvDecoder(decoder)
        except Exception as exc:  # CUDA out of memory, a driver reset: this worker's files go the CPU way
            log.warning("a shard worker could not start nvImageCodec (%s); it decodes on the CPU", type(exc).__name__)
            _DECODERS[decoder] = None
    return _DECODERS[decoder]


def resolve(choice: str) -> str:
    """The decoder a run uses for `--decoder choice`: CPU, GPU (or NVIMGCODEC_CPU, for tests). Checked here, in the
    parent, before any work: gpu without nvImageCodec or a CUDA GPU is a ConfigError naming the fix; auto says in one
    log line which decoder it took."""
    if choice == CPU:
        return CPU
    if choice not in (*DECODERS, NVIMGCODEC_CPU):
        raise ConfigError(f"decoder must be one of {', '.join(DECODERS)}, got {choice!r}")
    backend = NVIMGCODEC_CPU if choice == NVIMGCODEC_CPU else GPU
    reason = unavailable(backend)
    if reason is None:
        where = "the GPU" if backend == GPU else "its CPU codecs"
        log.info("decoder: nvImageCodec on %s for JPEG 2000, HTJ2K and baseline JPEG; the rest on the CPU", where)
        return backend
    if choice == "auto":
        log.info("decoder: CPU (no GPU decoding: %s)", reason)
        return CPU
    if backend == NVIMGCODEC_CPU:
        raise ConfigError(f"decoder {choice} needs NVIDIA nvImageCodec ({reason}); run {INSTALL_HINT}")
    raise ConfigError(
        f"--decoder gpu needs NVIDIA nvImageCodec and a CUDA GPU ({reason}); run {INSTALL_HINT} on a machine with "
        "a CUDA GPU, or use --decoder cpu"
    )


@cache
def unavailable(backend: str = GPU) -> str | None:
    """Why nvImageCodec cannot decode on `backend` in this process, as a fixed phrase; None when it can: it imports,
    a decoder starts, and it decodes a 12-bit lossless JPEG 2000 test image to exactly its pixels. The decoder is
    kept as this process's (`process_decoder`)."""
    try:
        _import()
    except ImportError:
        return "nvImageCodec is not installed"
    try:
        decoder = NvDecoder(backend)
    except Exception:  # RuntimeError "CUDA Runtime failure" without a driver or a device
        return "no CUDA GPU answered" if backend == GPU else "nvImageCodec did not start"
    pixels, codestream = _test_image()
    rows, cols = pixels.shape
    decoded = decoder.decode([codestream], rows, cols, pixels.dtype)
    if decoded is None:
        return "nvImageCodec found no JPEG 2000 decoder (nvJPEG2000)"
    if not np.array_equal(decoded[0], pixels):
        return "nvImageCodec decoded a lossless JPEG 2000 test image wrongly"
    _DECODERS[backend] = decoder
    return None


def _test_image() -> tuple[np.ndarray, bytes]:
    """A 64 x 48 12-bit image and its lossless JPEG 2000 codestream (OpenJPEG, a core dependency)."""
    import openjpeg

    pixels = ((np.arange(64 * 48, dtype=np.uint32).reshape(64, 48) * 37) % 4096).astype(np.uint16)
    chatty = logging.getLogger("openjpeg")  # logs "tile number 1 / 1" at INFO
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        return pixels, bytes(openjpeg.encode(pixels, bits_stored=12))
    finally:
        chatty.setLevel(level)


def _import() -> Any:
    with _quiet_stderr():
        from nvidia import nvimgcodec
    return nvimgcodec


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send the C-level stderr to /dev/null: nvImageCodec's extensions print a red error for every optional library
    that is absent (nvTIFF; nvJPEG2000 and nvJPEG without a GPU) in every worker, and a warning for every frame
    they cannot decode. What matters is checked instead: `unavailable` decodes a test image, and the manifest
    counts the files that went the CPU way."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
