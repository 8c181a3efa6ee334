"""Header text -> label vocabularies: body part spellings, ages and buckets, sex, view, laterality, vendor."""

from __future__ import annotations

import pytest

from radpretrain.errors import ConfigError
from radpretrain.shards import labels


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("CHEST", "chest"),
        ("THORAX", "chest"),
        ("LUNG", "chest"),
        ("Brust", "chest"),
        ("Tórax", "chest"),
        ("HAND", "hand"),
        ("L SPINE", "lspine"),
        ("LSPINE", "lspine"),
        ("L-SPINE", "lspine"),
        ("Lendenwirbelsäule", "lspine"),
        ("LWS", "lspine"),
        ("CSPINE", "cspine"),
        ("TSPINE", "tspine"),
        ("THORACIC SPINE", "tspine"),
        ("HANDGELENK", "wrist"),
        ("FOREARM", "wrist"),
        ("ARM", "arm"),
        ("HUMERUS", "arm"),
        ("HIP", "pelvis"),
        ("Hüfte", "pelvis"),
        ("PELVIS", "pelvis"),
        ("SKULL", "skull"),
        ("Schädel", "skull"),
        ("KNEE", "knee"),
        ("Knie", "knee"),
        ("ANKLE", "ankle"),
        ("Sprunggelenk", "ankle"),
        ("FOOT", "foot"),
        ("Fuß", "foot"),
        ("BREAST", "breast"),
        ("ABDOMEN", "abdomen"),
        ("SHOULDER", "shoulder"),
        ("CLAVICLE", "shoulder"),
        ("ELBOW", "elbow"),
        ("FEMUR", "leg"),
        ("", "unknown"),
        ("XYZZY", "unknown"),
        (None, "unknown"),
    ],
)
def test_body_part_spellings(text: str | None, expected: str) -> None:
    assert labels.body_part_from_text(text) == expected
    assert expected in labels.BODY_PARTS


def test_body_part_falls_back_to_descriptions_in_order() -> None:
    assert labels.normalize_body_part("", "XR KNIE LINKS", "CHEST") == "knee"
    assert labels.normalize_body_part("CHEST", "KNEE") == "chest"
    assert labels.normalize_body_part(None, None, "Protocol: Thorax PA") == "chest"
    assert labels.normalize_body_part("", "", "") == "unknown"


@pytest.mark.parametrize(
    ("value", "years"),
    [("045Y", 45), ("095Y", 90), ("006M", 0), ("018M", 1), ("010W", 0), ("400D", 1), ("30", 30), ("bad", None)],
)
def test_dicom_age_strings_capped(value: str, years: int | None) -> None:
    assert labels.cap_age(labels.parse_age_string(value)) == years


def test_age_from_dates() -> None:
    assert labels.cap_age(labels.age_from_dates("19800615", "20200614")) == 39
    assert labels.cap_age(labels.age_from_dates("19800615", "20200615")) == 40
    assert labels.cap_age(labels.age_from_dates("19000101", "20200101")) == 90
    assert labels.age_from_dates("20200101", "19800101") is None
    assert labels.age_from_dates("", "20200101") is None
    assert labels.age_from_dates("20201341", "20210101") is None


@pytest.mark.parametrize(
    ("value", "years"),
    [("33", 33), ("50+", 50), ("early 40s", 42), ("mid 50s", 55), ("late 30s", 38), ("6 months", 0), ("", None)],
)
def test_free_ages(value: str, years: int | None) -> None:
    assert labels.cap_age(labels.parse_free_age(value)) == years


def test_age_buckets_default_and_custom() -> None:
    buckets = labels.AgeBuckets.parse()
    assert [buckets.bucket(a) for a in (0, 1, 2, 11, 12, 17, 18, 39, 40, 64, 65, 79, 80, 90)] == [
        "0-1",
        "0-1",
        "2-11",
        "2-11",
        "12-17",
        "12-17",
        "18-39",
        "18-39",
        "40-64",
        "40-64",
        "65-79",
        "65-79",
        "80+",
        "80+",
    ]
    assert buckets.bucket(None) is None
    adults = labels.AgeBuckets.parse(["0-17", "18+"])
    assert adults.bucket(17) == "0-17" and adults.bucket(18) == "18+"


@pytest.mark.parametrize("specs", [[], ["1-5", "6+"], ["0-5", "7+"], ["0-5", "6-10"], ["0-5", "5-3", "6+"], ["95+"]])
def test_bad_age_buckets_refused(specs: list[str]) -> None:
    with pytest.raises(ConfigError, match="age bucket"):
        labels.AgeBuckets.parse(specs)


def test_sex_view_laterality_vendor() -> None:
    assert [labels.normalize_sex(v) for v in ("M", "f", "O", "W", "", None, "Q")] == [
        "M",
        "F",
        "O",
        "F",
        None,
        None,
        None,
    ]
    assert [labels.normalize_view(v) for v in ("PA", "AP erect", "LL", "RL", "LATERAL", "RAO", "MLO", "CC", "")] == [
        "PA",
        "AP",
        "LAT",
        "LAT",
        "LAT",
        "OBL",
        "OBL",
        "OTHER",
        None,
    ]
    assert labels.view_from_text("CHEST PA AND LATERAL") == "PA"
    assert labels.view_from_text("KNEE") is None
    assert [labels.normalize_laterality(v) for v in ("L", "R", "B", "U", "", None)] == [
        "L",
        "R",
        None,
        None,
        None,
        None,
    ]
    assert labels.normalize_manufacturer("SIEMENS") == "siemens"
    assert labels.normalize_manufacturer("GE Healthcare") == "ge"
    assert labels.normalize_manufacturer("FUJIFILM Corporation") == "fujifilm"
    assert labels.normalize_manufacturer("Eastman Kodak") == "carestream"
    assert labels.normalize_manufacturer("Acme Garage X-Ray Ltd") == "other"
    assert labels.normalize_manufacturer("") is None
    assert set(labels.VENDORS) >= {"other", "siemens"}
