"""Pseudonym key handling, HMAC pseudonyms, header -> allow-listed fields, and the last-gate json check."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000Lossless

from radpretrain.errors import ConfigError, ShardError
from radpretrain.shards import deid, labels
from radpretrain.shards.format import SAMPLE_FIELDS


def test_key_created_private_and_stable(tmp_path: Path) -> None:
    key_path = tmp_path / "keys" / "deid.key"
    first = deid.load_key(key_path, out=tmp_path / "out")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert deid.load_key(key_path) == first
    a, b = deid.Pseudonymizer(first), deid.Pseudonymizer(deid.load_key(key_path))
    assert a("patient", "P1") == b("patient", "P1")
    assert deid.is_pseudonym(a("patient", "P1"))
    assert a("patient", "P1") != a("study", "P1")  # kinds are separated
    other = deid.Pseudonymizer(deid.load_key(tmp_path / "other.key"))
    assert other("patient", "P1") != a("patient", "P1")
    assert other.fingerprint != a.fingerprint
    assert 0.0 <= a.fraction("split", "x") < 1.0


def test_key_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(deid.KEY_ENV, str(tmp_path / "env.key"))
    assert deid.resolve_key_path(None) == (tmp_path / "env.key").resolve()
    deid.load_key(None)
    assert (tmp_path / "env.key").is_file()
    assert deid.resolve_key_path(tmp_path / "given.key") == (tmp_path / "given.key").resolve()


def test_key_inside_output_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="inside the output folder"):
        deid.load_key(tmp_path / "out" / "deid.key", out=tmp_path / "out")
    assert not (tmp_path / "out" / "deid.key").exists()


def test_world_readable_key_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key_path = tmp_path / "deid.key"
    deid.load_key(key_path)
    os.chmod(key_path, 0o644)
    with caplog.at_level(logging.WARNING):
        deid.load_key(key_path)
    assert "readable by other users" in caplog.text


def test_short_key_refused(tmp_path: Path) -> None:
    key_path = tmp_path / "deid.key"
    key_path.write_text("short\n")
    with pytest.raises(ConfigError, match="too short"):
        deid.load_key(key_path)


def _header(**values: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    for name, value in values.items():
        setattr(ds, name, value)
    return ds


def test_header_fields_hold_only_derived_values() -> None:
    pseudo = deid.Pseudonymizer(b"k" * 32)
    ds = _header(
        PatientID="SMITH^JOHN-123",
        PatientName="SMITH^JOHN",
        StudyInstanceUID="1.2.3.4.5",
        SOPInstanceUID="1.2.3.4.5.6",
        PatientAge="095Y",
        PatientSex="F",
        Modality="DX",
        BodyPartExamined="",
        StudyDescription="Thorax pa SMITH JOHN",
        ViewPosition="",
        ImageLaterality="L",
        Manufacturer="Siemens Healthineers (Dr. Smith's room)",
        BitsStored=12,
    )
    fields = deid.header_fields(ds, pseudo, labels.AgeBuckets.parse())
    assert fields == {
        "patient": pseudo("patient", "SMITH^JOHN-123"),
        "study": pseudo("study", "1.2.3.4.5"),
        "body_part": "chest",
        "age_years": 90,
        "age_bucket": "80+",
        "sex": "F",
        "view": "PA",
        "laterality": "L",
        "modality": "DX",
        "manufacturer": "siemens",
        "bits_stored": 12,
        "transfer_syntax": "JPEG 2000 Image Compression (Lossless Only)",
    }
    assert "SMITH" not in repr(fields) and "1.2.3" not in repr(fields)


def test_header_fields_age_from_dates_and_patient_fallback() -> None:
    pseudo = deid.Pseudonymizer(b"k" * 32)
    ds = _header(StudyInstanceUID="9.8.7", SOPInstanceUID="9.8.7.1", PatientBirthDate="20100301", StudyDate="20200229")
    ds.Modality = "Sekretariat Dr. Who"
    fields = deid.header_fields(ds, pseudo, labels.AgeBuckets.parse())
    assert fields["age_years"] == 9 and fields["age_bucket"] == "2-11"
    assert fields["patient"] == pseudo("patient-from-study", "9.8.7")
    assert fields["modality"] == "other"
    assert fields["manufacturer"] is None and fields["sex"] is None and fields["view"] is None


def test_unregistered_transfer_syntax_is_not_echoed() -> None:
    assert deid.transfer_syntax_name("1.2.826.0.1.3680043.99.1") == "unknown"
    assert deid.transfer_syntax_name("") == "unknown"


def _meta(**changes: object) -> dict[str, object]:
    meta: dict[str, object] = {name: None for name in SAMPLE_FIELDS}
    meta.update(schema_version=1, patient="a" * 32, split="train", body_part="chest", sex="M", offset=0)
    meta.update(spacing_mm=[0.5, 0.5], transfer_syntax="Explicit VR Little Endian", window_center=100.0)
    meta.update(changes)
    return meta


def test_check_sample_meta_gate() -> None:
    vocab = {"age_bucket": list(labels.DEFAULT_AGE_BUCKETS)}
    deid.check_sample_meta(_meta(age_bucket="80+"), vocab)
    for bad in (
        {"notes": "x"},
        {"patient": "SMITH^JOHN"},
        {"body_part": "Thorax of Mr Smith"},
        {"transfer_syntax": "1.2.840.10008.1.2.1"},
        {"window_center": "100"},
        {"age_bucket": "ninety"},
    ):
        with pytest.raises(ShardError):
            deid.check_sample_meta(_meta(**bad), vocab)
