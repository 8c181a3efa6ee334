"""A small synthetic archive with planted near-duplicates, sharded, and a deterministic untrained encoder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid


@dataclass
class Planted:
    shards: Path
    encoder: Path
    pairs: list[tuple[str, str, str]]  # (original key, copy key, "same patient" / "across patients")


def plant_copy(source: Path, target: Path, rng: np.random.Generator, *, new_patient: str | None) -> tuple[str, str]:
    """Copy a DICOM file as a new instance (new SOPInstanceUID) with tiny pixel noise (+-2 of 10-16 bits)."""
    ds = pydicom.dcmread(source)
    original = str(ds.SOPInstanceUID)
    stored = ds.pixel_array
    pixels = stored.astype(np.int64)
    bits = int(ds.BitsStored)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if ds.PixelRepresentation else (0, (1 << bits) - 1)
    copy = pixels.copy()
    # (a shifted copy is a harder case than an untrained encoder can take: features of a random network move a lot)
    copy += rng.integers(-2, 3, size=pixels.shape)
    ds.PixelData = np.clip(copy, low, high).astype(stored.dtype).tobytes()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if new_patient is not None:  # the same image filed again under another patient ID
        ds.PatientID = new_patient
    ds.save_as(target)
    return original, str(ds.SOPInstanceUID)


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    import torch

    from radpretrain.cli import main
    from radpretrain.models.encoders import build_encoder, save_encoder
    from radpretrain.shards.deid import Pseudonymizer, load_key
    from radpretrain.synth import generate

    root = tmp_path_factory.mktemp("planted")
    src = root / "src"
    generate(src, 36, seed=3, min_size=64, max_size=96, syntaxes=["ExplicitVRLittleEndian"], progress=False)
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() not in (".json", ".csv"))
    rng = np.random.default_rng(0)
    copies = []
    for number, (source, other) in enumerate([(files[2], None), (files[11], "REFILED-1"), (files[23], None)]):
        original, sop = plant_copy(source, source.with_name(f"copy{number}.dcm"), rng, new_patient=other)
        copies.append((original, sop, "across patients" if other else "same patient"))
    key = root / "deid.key"
    argv = ["shard", str(src), str(root / "shards"), "--key", str(key), "--size", "64", "--shard-size", "8"]
    assert main([*argv, "--workers", "1", "--no-progress"]) == 0
    pseudonym = Pseudonymizer(load_key(key))
    pairs = [(pseudonym("sop", a), pseudonym("sop", b), kind) for a, b, kind in copies]

    torch.manual_seed(0)
    encoder = build_encoder("test_resnet", img_size=32)
    save_encoder(encoder, root / "encoder", {"input_size": [1, 32, 32]})
    return Planted(root / "shards", root / "encoder", pairs)
