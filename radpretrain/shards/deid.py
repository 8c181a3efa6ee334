"""What may leave the hospital: HMAC pseudonyms under a private key, allow-listed derived fields, capped ages."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any

from radpretrain.errors import ConfigError, ShardError
from radpretrain.shards import labels
from radpretrain.shards.format import SAMPLE_FIELDS, SPLITS

log = logging.getLogger(__name__)

KEY_ENV = "RADPRETRAIN_KEY_FILE"
DEFAULT_KEY_PATH = "~/.config/radpretrain/deid.key"
#: Hex characters kept from an HMAC-SHA256 digest: 128 bits, collision-free at archive scale.
PSEUDONYM_CHARS = 32


#: Modality codes that may be written as they are (PS3.3 C.7.3.1.1.1 plus the common non-standard DR);
#: any other value is free text as far as we are concerned and becomes "other".
MODALITY_CODES: frozenset[str] = frozenset(
    {"CR", "DX", "MG", "RF", "XA", "DR", "IO", "PX", "OT", "SC", "CT", "MR", "US", "NM", "PT", "XC", "ES", "BMD", "RG"}
)

_HEX = re.compile(rf"^[0-9a-f]{{{PSEUDONYM_CHARS}}}$")


def resolve_key_path(key: str | Path | None = None) -> Path:
    """`--key`, else $RADPRETRAIN_KEY_FILE, else ~/.config/radpretrain/deid.key."""
    chosen = key if key is not None else os.environ.get(KEY_ENV) or DEFAULT_KEY_PATH
    return Path(chosen).expanduser().resolve()


def load_key(key: str | Path | None = None, *, out: str | Path | None = None) -> bytes:
    """Read the pseudonym key, creating it (mode 0600) when missing; refuse one inside the output folder."""
    path = resolve_key_path(key)
    if out is not None and is_inside(path, Path(out)):
        raise ConfigError(
            f"the de-identification key {path} is inside the output folder, which may be shared; "
            f"keep it elsewhere (--key PATH or ${KEY_ENV}), e.g. {DEFAULT_KEY_PATH}"
        )
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
        log.info(
            "created a new de-identification key at %s (keep it private and backed up: the same key "
            "gives the same pseudonyms)",
            path,
        )
    if not path.is_file():
        raise ConfigError(f"the de-identification key {path} is not a file; give a key file with --key PATH")
    mode = path.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("warning: the de-identification key %s is readable by other users; run: chmod 600 %s", path, path)
    key_bytes = path.read_bytes().strip()
    if len(key_bytes) < 32:
        raise ConfigError(
            f"the de-identification key {path} is too short ({len(key_bytes)} bytes, need 32 or more); "
            "delete it to have a new one made, or give another with --key PATH"
        )
    return key_bytes


def quiet_header_echo() -> None:
    """Silence the libraries that quote header values in warnings and log lines (pydicom's validation).

    Called in every process that reads headers, so that no name or ID reaches a terminal or a log.
    """
    import warnings

    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    logger = logging.getLogger("pydicom")
    logger.setLevel(logging.CRITICAL + 1)
    logger.propagate = False
    for module in (r"pydicom(\..*)?", r"pylibjpeg(\..*)?", r"gdcm(\..*)?"):
        warnings.filterwarnings("ignore", module=module)


def is_inside(path: Path, folder: Path) -> bool:
    path, folder = path.expanduser().resolve(), folder.expanduser().resolve()
    return path == folder or folder in path.parents


class Pseudonymizer:
    """HMAC-SHA256 pseudonyms: the same key and value give the same hex string; kinds never collide."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError(f"key must be at least 32 bytes, got {len(key)}")
        self.key = key  # kept for worker processes, which rebuild the pseudonymizer

    def __call__(self, kind: str, value: str) -> str:
        return self._digest(kind, value)[:PSEUDONYM_CHARS]

    def fraction(self, kind: str, value: str) -> float:
        """A deterministic number in [0, 1) for `value` (the patient-level split draws from it)."""
        return int(self._digest(kind, value)[:16], 16) / float(1 << 64)

    @property
    def fingerprint(self) -> str:
        """Names the key in plans (a rerun with another key must not mix pseudonyms) without revealing it."""
        return self("key-fingerprint", "radpretrain")[:16]

    def _digest(self, kind: str, value: str) -> str:
        message = f"{kind}\x00{value}".encode()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()


def is_pseudonym(value: object) -> bool:
    return isinstance(value, str) and _HEX.match(value) is not None


def transfer_syntax_name(uid: object) -> str:
    """The registered name of a transfer syntax, "unknown" for anything unregistered (never the UID)."""
    from pydicom.uid import UID

    if not uid:
        return "unknown"
    value = UID(str(uid))
    return value.name if value.is_transfer_syntax and value.name != str(value) else "unknown"


def modality_code(value: object) -> str:
    text = labels.clean_text(value)
    return text if text in MODALITY_CODES else "other"


def header_fields(ds: Any, pseudonymize: Pseudonymizer, buckets: labels.AgeBuckets) -> dict[str, Any]:
    """Derive the allow-listed label fields of one DICOM header (a pydicom Dataset, pixels not needed).

    Only vocabulary values, capped whole-year ages and pseudonyms come out; the patient falls back to
    the study and then the instance when the header has no PatientID, so such files are not pooled.
    """
    sop = _text(ds, "SOPInstanceUID")
    study_uid = _text(ds, "StudyInstanceUID")
    patient_id = _text(ds, "PatientID")
    patient = pseudonymize("patient", patient_id) if patient_id else None
    if patient is None:
        patient = pseudonymize("patient-from-study", study_uid) if study_uid else pseudonymize("patient-from-sop", sop)
    study = pseudonymize("study", study_uid) if study_uid else None
    years = labels.parse_age_string(_text(ds, "PatientAge"))
    if years is None:
        seen = next(
            (d for d in (_text(ds, n) for n in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")) if d),
            "",
        )
        years = labels.age_from_dates(_text(ds, "PatientBirthDate"), seen)
    age = labels.cap_age(years)
    descriptions = [_text(ds, n) for n in ("StudyDescription", "SeriesDescription", "ProtocolName")]
    view = labels.normalize_view(_text(ds, "ViewPosition"))
    if view is None:
        view = next((v for v in map(labels.view_from_text, descriptions[::-1]) if v is not None), None)
    laterality = labels.normalize_laterality(_text(ds, "ImageLaterality")) or labels.normalize_laterality(
        _text(ds, "Laterality")
    )
    file_meta = getattr(ds, "file_meta", None)
    bits = ds.get("BitsStored")
    return {
        "patient": patient,
        "study": study,
        "body_part": labels.normalize_body_part(_text(ds, "BodyPartExamined"), *descriptions),
        "age_years": age,
        "age_bucket": buckets.bucket(age),
        "sex": labels.normalize_sex(_text(ds, "PatientSex")),
        "view": view,
        "laterality": laterality,
        "modality": modality_code(_text(ds, "Modality")),
        "manufacturer": labels.normalize_manufacturer(_text(ds, "Manufacturer")),
        "bits_stored": int(bits) if isinstance(bits, int) and 1 <= bits <= 32 else None,
        "transfer_syntax": transfer_syntax_name(getattr(file_meta, "TransferSyntaxUID", None)),
    }


def _text(ds: Any, keyword: str) -> str:
    """A header value as text, empty when absent or unreadable (hostile headers must not stop a run)."""
    try:
        value = ds.get(keyword)
    except Exception:  # pydicom raises on malformed values only when they are accessed
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else ""
    return str(value).strip()


def check_sample_meta(meta: dict[str, Any], vocab: dict[str, list[str]]) -> None:
    """Refuse a sample json that holds anything but allow-listed keys with vocabulary or numeric values.

    This is the last gate before bytes leave the process: a bug elsewhere that routed a header string
    into the json fails loudly here instead of leaking.
    """
    extra = set(meta) - set(SAMPLE_FIELDS)
    if extra:
        raise ShardError(f"sample metadata holds keys outside the allow-list: {sorted(extra)}")
    allowed_text: dict[str, set[str]] = {
        "split": set(SPLITS),
        "body_part": set(labels.BODY_PARTS),
        "age_bucket": set(vocab.get("age_bucket", [])),
        "sex": set(labels.SEXES),
        "view": set(labels.VIEWS),
        "laterality": set(labels.LATERALITIES),
        "modality": set(MODALITY_CODES) | {"other"},
        "manufacturer": set(labels.VENDORS),
    }
    for name, value in meta.items():
        if value is None or isinstance(value, bool):
            continue
        if name in ("patient", "study"):
            ok = is_pseudonym(value)
        elif name in allowed_text:
            ok = value in allowed_text[name]
        elif name == "transfer_syntax":
            ok = isinstance(value, str) and (value in _registered_syntax_names() or value in PLAIN_SYNTAXES)
        elif name in ("spacing_mm", "original_shape"):
            ok = isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)
        else:
            ok = isinstance(value, (int, float))
        if not ok:
            raise ShardError(f"sample metadata field '{name}' holds a value outside its allowed form")


#: transfer_syntax values of plain (non-DICOM) images.
PLAIN_SYNTAXES: frozenset[str] = frozenset({"PNG file", "JPEG file", "unknown"})

_SYNTAX_NAMES: set[str] = set()


def _registered_syntax_names() -> set[str]:
    if not _SYNTAX_NAMES:
        from pydicom.uid import UID, AllTransferSyntaxes

        _SYNTAX_NAMES.update(UID(uid).name for uid in AllTransferSyntaxes)
    return _SYNTAX_NAMES
