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
#: the hip with the femoral head and neck, "arm" the humerus, "wrist" the forearm, "leg" the femur, tibia
#: and fibula, "skull" the face, jaw and TMJ, "shoulder" the clavicle and scapula, "chest" the ribs and sternum.
#: Terms without a class of their own are mapped in `_DEFINED_TERMS` below.
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

# BodyPartExamined defined terms (DICOM PS3.16 CID 4031) that name several regions or a part with no class of its
# own, matched on the whole field with the spaces removed ("ABDOMEN PELVIS" == "ABDOMENPELVIS"). Decisions:
# a compound takes the region that fills most of the image (ABDOMENPELVIS -> abdomen, CHESTABDOMEN and NECKCHEST
# -> chest, HEADNECK -> skull); TLSPINE (the thoracolumbar junction, T11-L2) -> tspine, CTSPINE -> cspine,
# LSSPINE -> lspine; the sacroiliac joints stay with the sacrum (lspine); SCJOINT (at the sternum) -> chest,
# ACJOINT -> shoulder; LOWERLIMB -> leg, UPPERLIMB -> arm; SPINE, WHOLEBODY and EXTREMITY name no single class.
_DEFINED_TERMS: dict[str, str] = {
    "ABDOMENPELVIS": "abdomen",
    "ABDPELVIS": "abdomen",
    "CHESTABDOMEN": "chest",
    "CHESTABDPELVIS": "chest",
    "NECKCHEST": "chest",
    "NECKCHESTABDOMEN": "chest",
    "NECKCHESTABDPELV": "chest",
    "NECKCHESTABDPELVIS": "chest",
    "HEADNECK": "skull",
    "CTSPINE": "cspine",
    "TLSPINE": "tspine",
    "LSSPINE": "lspine",
    "SIJOINT": "lspine",
    "SCJOINT": "chest",
    "ACJOINT": "shoulder",
    "UPPERARM": "arm",
    "UPPERLIMB": "arm",
    "RADIUSULNA": "wrist",
    "LOWERLEG": "leg",
    "LOWERLIMB": "leg",
    "POPLITEALFOSSA": "knee",
    "PELVISLOWEXTREMT": "pelvis",
    "SPINE": UNKNOWN,
    "WHOLEBODY": UNKNOWN,
    "EXTREMITY": UNKNOWN,
}

# Phrases where a generic word qualifies a specific part: the "head" or "neck" of a long bone is that bone's
# joint, not the skull or the cervical spine; "sinus tarsi" is in the foot. They are tried before the words below.
_BODY_PHRASES: tuple[tuple[str, str], ...] = (
    (
        "pelvis",
        r"FEMORAL (?:HEAD|NECK)|FEMUR (?:HEAD|NECK)|(?:HEAD|NECK) OF (?:THE )?(?:LEFT |RIGHT )?FEMUR|NOF"
        r"|SCHENKELHALS\w*|(?:FEMUR|HUFT|HUEFT)KOPF\w*|COL (?:DU )?FEMUR|COL FEMORAL|TETE (?:DU )?FEMUR|TETE FEMORALE"
        r"|CUELLO (?:DEL? )?FEMUR|CUELLO FEMORAL|CABEZA (?:DEL? )?FEMUR|CABEZA FEMORAL",
    ),
    (
        "shoulder",
        r"HUMERAL (?:HEAD|NECK)|HUMERUS (?:HEAD|NECK)|(?:HEAD|NECK) OF (?:THE )?(?:LEFT |RIGHT )?HUMERUS"
        r"|SURGICAL NECK|HUMERUSKOPF\w*|TETE HUMERALE|CABEZA (?:DEL )?HUMERO|CABEZA HUMERAL",
    ),
    (
        "elbow",
        r"RADIAL (?:HEAD|NECK)|RADIUS (?:HEAD|NECK)|(?:HEAD|NECK) OF (?:THE )?(?:LEFT |RIGHT )?RADIUS"
        r"|RADIUSKOPF\w*|TETE RADIALE|CABEZA (?:DEL )?RADIO|CUPULA RADIAL",
    ),
    ("wrist", r"ULNAR HEAD|HEAD OF (?:THE )?ULNA|ULNAKOPF\w*"),
    ("knee", r"FIBULAR HEAD|FIBULA HEAD|HEAD OF (?:THE )?FIBULA|FIBULAKOPF\w*|TETE (?:DU )?PERONE|TETE FIBULAIRE"),
    ("ankle", r"TALAR (?:HEAD|NECK)|(?:HEAD|NECK) OF (?:THE )?TALUS"),
    ("foot", r"SINUS TARSI|METATARSAL HEADS?"),
    ("hand", r"METACARPAL HEADS?"),
    ("skull", r"HEAD (?:AND )?NECK|KOPF HALS"),
    ("abdomen", r"ABDOMEN (?:AND )?PELVIS|ABDO? PELV?\w*"),
    ("chest", r"(?:CHEST|THORAX) (?:AND )?ABDO?\w*"),
    ("tspine", r"TL SPINE|THORACOLUMBAR\w*|THORAKOLUMBAL\w*|DORSO ?LOMBAIRE"),
    ("cspine", r"CERVICOTHORACIC\w*|ZERVIKOTHORAKAL\w*"),
)

# Ordered: the first rule that matches wins, so specific phrases ("L SPINE", "HANDGELENK", "FOREARM")
# come before the general words they contain ("SPINE", "HAND", "ARM"). Text is upper-cased, stripped
# of accents (ß -> SS) and of punctuation before matching; `\b` keeps "ARM" from matching "FOREARM".
_BODY_RULES: tuple[tuple[str, str], ...] = (
    ("cspine", r"C ?SPINE|CERVICAL|HWS|HALSWIRBEL\w*|RACHIS CERVICAL|COLUMNA CERVICAL|ODONTOID|DENS"),
    ("tspine", r"T ?SPINE|THORACIC SPINE|DORSAL SPINE|BWS|BRUSTWIRBEL\w*|RACHIS DORSAL|COLUMNA DORSAL"),
    (
        "lspine",
        r"L ?SPINE|LUMBAR\w*|LUMBO\w*|LWS|LENDENWIRBEL\w*|RACHIS LOMBAIRE|LOMBAIRE|COLUMNA LUMBAR|SACRUM|S ?SPINE",
    ),
    ("lspine", r"SACR\w*|COCCYX|COCCY\w*|STEISSBEIN|SIJ|SI JOINTS?|ISG|KREUZBEIN"),
    ("breast", r"BREASTS?|MAMMO\w*|MAMMA|BRUSTDRUSE|MAMA"),
    ("wrist", r"WRIST|FOREARM|RADIUS|ULNA|HANDGELENK|UNTERARM|POIGNET|AVANT BRAS|MUNECA|ANTEBRAZO|SCAPHOID|KAHNBEIN"),
    ("hand", r"HANDS?|FINGERS?|THUMB|DAUMEN|MANO|DOIGTS?|POUCE|DEDOS?|METACARP\w*|PHALANG\w*|MITTELHAND"),
    ("elbow", r"ELBOW|ELLENBOGEN|ELLBOGEN|COUDE|CODO|OLECRANON"),
    (
        "shoulder",
        r"SHOULDER|SCHULTER\w*|EPAULE|HOMBRO|CLAVICLE|CLAVICULA|CLAVICULE|SCAPULA|OMOPLATE|SCHLUSSELBEIN|AC JOINTS?"
        r"|ACROMIO\w*",
    ),
    ("arm", r"ARM|UPPER ARM|HUMERUS|OBERARM|BRAZO"),
    ("ankle", r"ANKLE|SPRUNGGELENK\w*|OSG|CHEVILLE|TOBILLO|MALLEOL\w*|TALUS"),
    (
        "foot",
        r"FOOT|FEET|TOES?|HEEL|CALCANE\w*|\w*FUSS|FERSE\w*|ZEHEN?|PIED|PIE|ORTEILS?|METATARS\w*|TARS\w*|SESAMOID\w*",
    ),
    ("knee", r"KNEES?|KNIE\w*|GENOUX?|RODILLA|PATELLA|ROTULE"),
    ("leg", r"LEGS?|LOWER LEG|THIGH|CALF|FEMUR|TIBIA|FIBULA|UNTERSCHENKEL|OBERSCHENKEL|JAMBE|PIERNA|MUSLO|CUISSE"),
    (
        "pelvis",
        r"PELVIS|PELVIC|HIPS?|BECKEN\w*|HUE?FT\w*|BASSIN|HANCHES?|CADERA|ACETABUL\w*|SYMPHYS\w*|ILIUM|BUTTOCKS?"
        r"|GLUTE\w*",
    ),
    (
        "skull",
        r"SKULL|CRANI\w*|\w*SCHADEL|CRANE|CRANEO|FACIAL|SINUS\w*|MANDIB\w*|\w*KIEFER\w*|JAW|TMJ|ZYGOMA\w*|JOCHBEIN"
        r"|MAXILLA\w*|NASAL|NOSE|NASEN\w*|NNH|ORBITS?|ORBITA|SELLA|MASTOID\w*|OPG",
    ),
    ("skull", r"PANORAMIC|DENTAL|TEETH|ZAHN\w*"),
    (
        "chest",
        r"CHEST|THORAX\w*|LUNGS?|LUNGE|THORAKS?|BRUST|BRUSTKORB|BRUSTBEIN|TORAX|POITRINE|POUMONS?|PECHO|RIBS?|STERNUM"
        r"|RIPPEN|COTES|COSTAL|HEART|CXR|PULMO\w*|MEDIASTIN\w*",
    ),
    ("abdomen", r"ABDOMEN\w*|ABDOMINAL|ABDO|ABD|BAUCH|KUB"),
)

# Words that name a part only when nothing more specific does: "head"/"neck" also qualify bones ("head of the
# radius"), French "main" (hand) is also English ("Knee main"), "face" is also the French frontal view ("Thorax
# face", "de face", "face et profil"), German "sein" (breast in French) is a common verb.
_NOT_QUALIFYING = "".join(
    f"(?<!{word} )"
    for word in ("FEMORAL", "FEMUR", "HUMERAL", "HUMERUS", "RADIAL", "RADIUS", "ULNAR", "FIBULAR", "TALAR", "SURGICAL")
)
_BODY_WEAK: tuple[tuple[str, str], ...] = (
    ("cspine", rf"{_NOT_QUALIFYING}(?:NECK|HALS|CUELLO|COU)(?! OF\b)"),
    ("skull", rf"{_NOT_QUALIFYING}(?:HEAD|KOPF|TETE|CABEZA)(?! OF\b)"),
    ("hand", r"MAINS?(?! (?:SERIES|VIEWS?|STUDY|EXAM|PROTOCOL|IMAGES?|SEQUENCE)\b)"),
    ("arm", r"BRAS"),
    ("breast", r"SEINS?"),
    ("skull", r"(?<!DE )FACE(?!(?: ET)? PROFIL\b)"),  # last: "Main droite face" is a hand
)
_BODY_PATTERNS = tuple(
    (label, re.compile(rf"\b(?:{pattern})\b")) for label, pattern in (*_BODY_PHRASES, *_BODY_RULES, *_BODY_WEAK)
)

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
    term = _DEFINED_TERMS.get(text.replace(" ", ""))
    if term is not None:
        return term
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
