"""Header values -> small label vocabularies: body part, age and age bucket, sex, view, laterality, vendor."""

from __future__ import annotations

import datetime as dt
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from radpretrain.errors import ConfigError

#: Body-part classes, built on the DICOM body-part defined terms (PS3.16 Annex L); "pelvis" includes
#: the hip, "arm" the humerus, "wrist" the forearm, "leg" the femur, tibia and fibula.
BODY_PARTS: tuple[str, ...] = (
    "chest",
    "abdomen",
    "pelvis",
    "skull",
    "cspine",
    "tspine",
    "lspine",
    "shoulder",
    "arm",
    "elbow",
    "wrist",
    "hand",
    "knee",
    "leg",
    "ankle",
    "foot",
    "breast",
    "unknown",
)
UNKNOWN = "unknown"

SEXES: tuple[str, ...] = ("M", "F", "O")
VIEWS: tuple[str, ...] = ("PA", "AP", "LAT", "OBL", "OTHER")
LATERALITIES: tuple[str, ...] = ("L", "R")
DEFAULT_AGE_BUCKETS: tuple[str, ...] = ("0-1", "2-11", "12-17", "18-39", "40-64", "65-79", "80+")
#: Ages above this are reported as this value (HIPAA Safe Harbor groups all ages over 89).
AGE_CAP = 90

#: Vendors as they appear in Manufacturer (0008,0070) after normalisation; anything else is "other".
VENDORS: tuple[str, ...] = (
    "agfa",
    "canon",
    "carestream",
    "fujifilm",
    "ge",
    "hologic",
    "konica_minolta",
    "philips",
    "samsung",
    "shimadzu",
    "siemens",
    "other",
)

# Ordered: the first rule that matches wins, so specific phrases ("L SPINE", "HANDGELENK", "FOREARM")
# come before the general words they contain ("SPINE", "HAND", "ARM"). Text is upper-cased, stripped
# of accents (ß -> SS) and of punctuation before matching; `\b` keeps "ARM" from matching "FOREARM".
_BODY_RULES: tuple[tuple[str, str], ...] = (
    ("cspine", r"C ?SPINE|CERVICAL|HWS|HALSWIRBEL\w*|RACHIS CERVICAL|COLUMNA CERVICAL|NECK|HALS|ODONTOID|DENS"),
    ("tspine", r"T ?SPINE|THORACIC SPINE|DORSAL SPINE|BWS|BRUSTWIRBEL\w*|RACHIS DORSAL|COLUMNA DORSAL"),
    ("lspine", r"L ?SPINE|LUMBAR\w*|LUMBO\w*|LWS|LENDENWIRBEL\w*|RACHIS LOMBAIRE|COLUMNA LUMBAR|SACRUM|S ?SPINE"),
    ("lspine", r"SACR\w*|COCCYX|SIJ|SI JOINTS?|KREUZBEIN"),
    ("breast", r"BREAST|MAMMO\w*|MAMMA|BRUSTDRUSE|SEIN|MAMA"),
    ("wrist", r"WRIST|FOREARM|RADIUS|ULNA|HANDGELENK|UNTERARM|POIGNET|AVANT BRAS|MUNECA|ANTEBRAZO|SCAPHOID|KAHNBEIN"),
    ("hand", r"HANDS?|FINGERS?|THUMB|DAUMEN|MAIN|MANO|DOIGTS?|DEDOS?|METACARP\w*|PHALANG\w*"),
    ("elbow", r"ELBOW|ELLENBOGEN|ELLBOGEN|COUDE|CODO|OLECRANON"),
    ("shoulder", r"SHOULDER|SCHULTER|EPAULE|HOMBRO|CLAVICLE|CLAVICULA|SCAPULA|SCHLUSSELBEIN|AC JOINT|ACROMIO\w*"),
    ("arm", r"ARM|UPPER ARM|HUMERUS|OBERARM|BRAS|BRAZO"),
    ("ankle", r"ANKLE|SPRUNGGELENK|OSG|CHEVILLE|TOBILLO|MALLEOL\w*"),
    ("foot", r"FOOT|FEET|TOES?|HEEL|CALCANEUS|FUSS|FERSE|ZEHEN?|PIED|PIE|CALCANEO|METATARS\w*|TARSUS"),
    ("knee", r"KNEE|KNIE|GENOU|RODILLA|PATELLA|KNIESCHEIBE"),
    ("leg", r"LEG|LOWER LEG|THIGH|FEMUR|TIBIA|FIBULA|UNTERSCHENKEL|OBERSCHENKEL|JAMBE|PIERNA|MUSLO|CUISSE"),
    ("pelvis", r"PELVIS|HIPS?|BECKEN|HUFTE|BASSIN|HANCHE|CADERA|PELVIS|ACETABUL\w*|SYMPHYS\w*|ABDOMEN PELVIS"),
    ("skull", r"SKULL|HEAD|CRANI\w*|SCHADEL|KOPF|CRANE|CRANEO|FACE|FACIAL|SINUS\w*|MANDIBLE|JAW|NASAL|ORBITS?|OPG"),
    ("skull", r"PANORAMIC|DENTAL|TEETH|ZAHN\w*|KIEFER"),
    ("chest", r"CHEST|THORAX|LUNGS?|THORAKS?|BRUST|TORAX|POITRINE|PECHO|RIBS?|STERNUM|RIPPEN|HEART|CXR|PULMO\w*"),
    ("abdomen", r"ABDOMEN|ABDOMINAL|ABD|BAUCH|ABDOMEN SIMPLE|KUB|ABDOMEN PELVIS|ABDOMEN AP"),
)
_BODY_PATTERNS = tuple((label, re.compile(rf"\b(?:{pattern})\b")) for label, pattern in _BODY_RULES)

_VIEW_WORDS: dict[str, str] = {
    "PA": "PA",
    "POSTEROANTERIOR": "PA",
    "AP": "AP",
    "ANTEROPOSTERIOR": "AP",
    "LL": "LAT",
    "RL": "LAT",
    "LAT": "LAT",
    "LATERAL": "LAT",
    "LLD": "LAT",
    "RLD": "LAT",
    "SEITLICH": "LAT",
    "OBL": "OBL",
    "OBLIQUE": "OBL",
    "LAO": "OBL",
    "RAO": "OBL",
    "LPO": "OBL",
    "RPO": "OBL",
    "MLO": "OBL",
    "SCHRAG": "OBL",
}

_VENDOR_RULES: tuple[tuple[str, str], ...] = (
    ("agfa", r"AGFA"),
    ("canon", r"CANON|TOSHIBA"),
    ("carestream", r"CARESTREAM|KODAK"),
    ("fujifilm", r"FUJI"),
    ("ge", r"\bGE\b|GENERAL ELECTRIC|GEMS|GE HEALTHCARE|GE MEDICAL"),
    ("hologic", r"HOLOGIC|LORAD"),
    ("konica_minolta", r"KONICA|MINOLTA"),
    ("philips", r"PHILIPS"),
    ("samsung", r"SAMSUNG"),
    ("shimadzu", r"SHIMADZU"),
    ("siemens", r"SIEMENS"),
)
_VENDOR_PATTERNS = tuple((label, re.compile(pattern)) for label, pattern in _VENDOR_RULES)


def clean_text(value: object) -> str:
    """Upper-case, accent-free, punctuation-free text for keyword matching ("Schädel-AP" -> "SCHADEL AP")."""
    if value is None:
        return ""
    text = str(value).replace("ß", "ss").replace("ẞ", "SS")
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).upper()
    return " ".join(re.sub(r"[^A-Z0-9]+", " ", text).split())


def body_part_from_text(value: object) -> str:
    """One free-ish text field -> a body-part class, or "unknown"."""
    text = clean_text(value)
    if not text:
        return UNKNOWN
    for label, pattern in _BODY_PATTERNS:
        if pattern.search(text):
            return label
    return UNKNOWN


def normalize_body_part(body_part_examined: object, *descriptions: object) -> str:
    """BodyPartExamined first, then Study/Series Description and ProtocolName keywords, else "unknown"."""
    for value in (body_part_examined, *descriptions):
        label = body_part_from_text(value)
        if label != UNKNOWN:
            return label
    return UNKNOWN


def normalize_sex(value: object) -> str | None:
    """PatientSex (and common spellings) -> "M", "F", "O" or None."""
    text = clean_text(value)
    if text in ("M", "MALE", "MAN", "MANNLICH", "MASCULINO", "MASCULIN", "H", "HOMME"):
        return "M"
    if text in ("F", "FEMALE", "WOMAN", "W", "WEIBLICH", "FEMENINO", "FEMININ", "FEMME"):
        return "F"
    if text in ("O", "OTHER", "DIVERS", "D", "X"):
        return "O"
    return None


def normalize_view(value: object) -> str | None:
    """ViewPosition or a view phrase ("AP erect") -> "PA", "AP", "LAT", "OBL", "OTHER", or None when empty."""
    text = clean_text(value)
    if not text:
        return None
    for word in text.split():
        if word in _VIEW_WORDS:
            return _VIEW_WORDS[word]
    return "OTHER"


def view_from_text(value: object) -> str | None:
    """A view word inside a description ("CHEST PA"), or None when the text names none."""
    for word in clean_text(value).split():
        if word in _VIEW_WORDS:
            return _VIEW_WORDS[word]
    return None


def normalize_laterality(value: object) -> str | None:
    """ImageLaterality / Laterality -> "L", "R", or None (both, unpaired or unknown)."""
    text = clean_text(value)
    if text in ("L", "LEFT", "LINKS", "GAUCHE", "IZQUIERDA"):
        return "L"
    if text in ("R", "RIGHT", "RECHTS", "DROITE", "DERECHA"):
        return "R"
    return None


def normalize_manufacturer(value: object) -> str | None:
    """Manufacturer -> one of VENDORS ("other" for unlisted vendors), None when empty."""
    text = clean_text(value)
    if not text:
        return None
    for label, pattern in _VENDOR_PATTERNS:
        if pattern.search(text):
            return label
    return "other"


_AGE_STRING = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12.0, "Y": 365.25}


def parse_age_string(value: object) -> float | None:
    """DICOM AS value ("045Y", "006M", "010W", "003D") -> age in years, None when absent or malformed."""
    if value is None:
        return None
    match = _AGE_STRING.match(str(value))
    if match is None:
        return None
    number, unit = int(match.group(1)), (match.group(2) or "Y").upper()
    return number * _DAYS_PER_UNIT[unit] / 365.25


def parse_dicom_date(value: object) -> dt.date | None:
    """DICOM DA value ("YYYYMMDD") -> date, None when absent or malformed."""
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def age_from_dates(birth: object, study: object) -> float | None:
    """Study date minus birth date in years, None when either is missing or the difference is negative."""
    born, seen = parse_dicom_date(birth), parse_dicom_date(study)
    if born is None or seen is None or seen < born:
        return None
    return (seen - born).days / 365.25


def parse_free_age(value: object) -> float | None:
    """A spreadsheet age ("33", "50+", "early 40s", "mid 50s", "6 months") -> years, None when unreadable."""
    text = str(value or "").strip().lower()
    if not text:
        return None
    match = re.search(r"(\d{1,3}(?:\.\d+)?)", text)
    if match is None:
        return None
    number = float(match.group(1))
    rest = text[match.end() :].strip()
    if rest.startswith(("month", "mo")):
        return number / 12.0
    if rest.startswith(("week", "wk")):
        return number * 7.0 / 365.25
    if rest.startswith("day"):
        return number / 365.25
    if rest.startswith("s") and number % 10 == 0:  # a decade: "early 40s" -> 42, "40s" -> 45, "late 40s" -> 48
        offset = 2.0 if "early" in text else 8.0 if "late" in text else 5.0
        return number + offset
    return number


def cap_age(years: float | None) -> int | None:
    """Whole years, capped at AGE_CAP; None stays None, nonsense (negative, > 150) becomes None."""
    if years is None or not math.isfinite(years) or years < 0 or years > 150:
        return None
    return min(math.floor(years), AGE_CAP)


@dataclass(frozen=True)
class AgeBuckets:
    """Contiguous whole-year ranges such as ("0-1", "2-11", ..., "80+"): the last one is open-ended."""

    names: tuple[str, ...]
    lows: tuple[int, ...]

    @classmethod
    def parse(cls, specs: Sequence[str] = DEFAULT_AGE_BUCKETS) -> AgeBuckets:
        specs = tuple(str(s).strip() for s in specs)
        if not specs:
            raise ConfigError("age buckets must not be empty; e.g. 0-1,2-11,12-17,18-39,40-64,65-79,80+")
        lows: list[int] = []
        expected = 0
        for i, spec in enumerate(specs):
            last = i == len(specs) - 1
            match = re.fullmatch(r"(\d+)\+" if last else r"(\d+)-(\d+)", spec)
            if match is None:
                form = "'N+' (open-ended)" if last else "'LOW-HIGH' in whole years"
                raise ConfigError(
                    f"age bucket '{spec}' must look like {form}; e.g. 0-1,2-11,12-17,18-39,40-64,65-79,80+"
                )
            low = int(match.group(1))
            if low != expected:
                raise ConfigError(f"age buckets must start at 0 and be contiguous: '{spec}' should start at {expected}")
            if not last:
                high = int(match.group(2))
                if high < low:
                    raise ConfigError(f"age bucket '{spec}' ends before it starts")
                expected = high + 1
            lows.append(low)
        if lows[-1] > AGE_CAP:
            raise ConfigError(f"the open-ended age bucket must start at or below {AGE_CAP} (ages are capped there)")
        return cls(names=specs, lows=tuple(lows))

    def bucket(self, age_years: int | None) -> str | None:
        if age_years is None:
            return None
        name = self.names[0]
        for low, candidate in zip(self.lows, self.names, strict=True):
            if age_years >= low:
                name = candidate
        return name
