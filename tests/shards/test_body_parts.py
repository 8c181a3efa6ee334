"""Body-part labels from real-world header text: BodyPartExamined terms; English, German, French descriptions."""

from __future__ import annotations

import pytest

from radpretrain.shards import labels

# BodyPartExamined (0018,0015) as written: the DICOM defined terms (PS3.16 CID 4031) and common vendor spellings.
# A term with no class of its own takes the documented mapping in labels.py (JAW, TMJ -> skull, CLAVICLE ->
# shoulder, RIB and STERNUM -> chest, compounds -> the region that fills most of the image).
BODY_PART_EXAMINED: list[tuple[str, str]] = [
    ("ABDOMEN", "abdomen"),
    ("ABDOMENPELVIS", "abdomen"),
    ("ACJOINT", "shoulder"),
    ("ANKLE", "ankle"),
    ("ARM", "arm"),
    ("BREAST", "breast"),
    ("BUTTOCK", "pelvis"),
    ("CALCANEUS", "foot"),
    ("CALF", "leg"),
    ("CHEST", "chest"),
    ("CHESTABDOMEN", "chest"),
    ("CHESTABDPELVIS", "chest"),
    ("CLAVICLE", "shoulder"),
    ("COCCYX", "lspine"),
    ("CSPINE", "cspine"),
    ("CTSPINE", "cspine"),
    ("ELBOW", "elbow"),
    ("EXTREMITY", "unknown"),
    ("FACE", "skull"),
    ("FEMUR", "leg"),
    ("FIBULA", "leg"),
    ("FINGER", "hand"),
    ("FOOT", "foot"),
    ("FOREARM", "wrist"),
    ("HAND", "hand"),
    ("HEAD", "skull"),
    ("HEADNECK", "skull"),
    ("HEART", "chest"),
    ("HEEL", "foot"),
    ("HIP", "pelvis"),
    ("HUMERUS", "arm"),
    ("ILIUM", "pelvis"),
    ("JAW", "skull"),
    ("KNEE", "knee"),
    ("LEG", "leg"),
    ("LOWERLEG", "leg"),
    ("LOWERLIMB", "leg"),
    ("LSPINE", "lspine"),
    ("LSSPINE", "lspine"),
    ("LUNG", "chest"),
    ("MANDIBLE", "skull"),
    ("MASTOID", "skull"),
    ("MAXILLA", "skull"),
    ("MEDIASTINUM", "chest"),
    ("NECK", "cspine"),
    ("NECKCHEST", "chest"),
    ("NECKCHESTABDOMEN", "chest"),
    ("NOSE", "skull"),
    ("ORBIT", "skull"),
    ("PATELLA", "knee"),
    ("PELVIS", "pelvis"),
    ("PELVISLOWEXTREMT", "pelvis"),
    ("POPLITEALFOSSA", "knee"),
    ("RADIUS", "wrist"),
    ("RADIUSULNA", "wrist"),
    ("RIB", "chest"),
    ("SACRUM", "lspine"),
    ("SCAPULA", "shoulder"),
    ("SCJOINT", "chest"),
    ("SELLA", "skull"),
    ("SESAMOID", "foot"),
    ("SHOULDER", "shoulder"),
    ("SIJOINT", "lspine"),
    ("SKULL", "skull"),
    ("SPINE", "unknown"),
    ("SSPINE", "lspine"),
    ("STERNUM", "chest"),
    ("THIGH", "leg"),
    ("THUMB", "hand"),
    ("TIBIA", "leg"),
    ("TLSPINE", "tspine"),
    ("TMJ", "skull"),
    ("TOE", "foot"),
    ("TSPINE", "tspine"),
    ("ULNA", "wrist"),
    ("UPPERLIMB", "arm"),
    ("WHOLEBODY", "unknown"),
    ("WRIST", "wrist"),
    ("ZYGOMA", "skull"),
    # Vendor and site spellings of the same terms.
    ("CHEST_PA", "chest"),
    ("Chest", "chest"),
    ("L-SPINE", "lspine"),
    ("C SPINE", "cspine"),
    ("LUMBAR SPINE", "lspine"),
    ("ABDOMEN PELVIS", "abdomen"),
    ("ABD", "abdomen"),
    ("KUB", "abdomen"),
    ("HANDS", "hand"),
    ("SI JOINT", "lspine"),
    ("AC JOINT", "shoulder"),
    ("Schädel", "skull"),
    ("BECKEN", "pelvis"),
    ("SCHULTER", "shoulder"),
    ("KNIE", "knee"),
    ("Fuß", "foot"),
    ("LWS", "lspine"),
]

ENGLISH: list[tuple[str, str]] = [
    ("XR CHEST 2 VIEWS", "chest"),
    ("CXR PA", "chest"),
    ("PORTABLE CHEST AP", "chest"),
    ("XR RIBS LEFT", "chest"),
    ("XR ABDOMEN 1 VIEW", "abdomen"),
    ("XR ABDOMEN SUPINE AND ERECT", "abdomen"),
    ("XR PELVIS AP", "pelvis"),
    ("XR HIP LEFT 2 VIEWS", "pelvis"),
    ("NECK OF FEMUR", "pelvis"),
    ("FEMUR NECK", "pelvis"),
    ("XR FEMORAL NECK RIGHT", "pelvis"),
    ("#NOF RIGHT", "pelvis"),
    ("FEMORAL HEAD", "pelvis"),
    ("XR FEMUR RIGHT", "leg"),
    ("XR TIBIA FIBULA", "leg"),
    ("XR KNEE 3 VIEWS", "knee"),
    ("Knee main", "knee"),
    ("XR PATELLA SKYLINE", "knee"),
    ("FIBULAR HEAD", "knee"),
    ("XR ANKLE 3 VIEWS", "ankle"),
    ("XR FOOT 3 VIEWS", "foot"),
    ("Sinus tarsi", "foot"),
    ("XR CALCANEUS AXIAL", "foot"),
    ("XR TOES RIGHT", "foot"),
    ("XR SHOULDER 2 VIEWS", "shoulder"),
    ("HUMERAL HEAD", "shoulder"),
    ("SURGICAL NECK OF HUMERUS", "shoulder"),
    ("XR CLAVICLE", "shoulder"),
    ("XR HUMERUS", "arm"),
    ("XR ELBOW 2 VIEWS", "elbow"),
    ("RADIAL HEAD", "elbow"),
    ("HEAD OF RADIUS", "elbow"),
    ("XR FOREARM", "wrist"),
    ("XR WRIST 4 VIEWS", "wrist"),
    ("SCAPHOID SERIES", "wrist"),
    ("XR HAND 3 VIEWS", "hand"),
    ("BONE AGE HAND", "hand"),
    ("XR FINGER LEFT INDEX", "hand"),
    ("XR SKULL 2 VIEWS", "skull"),
    ("XR FACIAL BONES", "skull"),
    ("XR SINUSES", "skull"),
    ("XR MANDIBLE", "skull"),
    ("OPG", "skull"),
    ("HEAD AND NECK", "skull"),
    ("XR CERVICAL SPINE 3 VIEWS", "cspine"),
    ("XR C-SPINE FLEX EXT", "cspine"),
    ("XR NECK SOFT TISSUE", "cspine"),
    ("XR THORACIC SPINE", "tspine"),
    ("XR T-SPINE", "tspine"),
    ("THORACOLUMBAR SPINE", "tspine"),
    ("XR LUMBAR SPINE 2 VIEWS", "lspine"),
    ("XR L-SPINE 2V", "lspine"),
    ("XR SACRUM AND COCCYX", "lspine"),
    ("MAMMO SCREENING BILATERAL", "breast"),
]

GERMAN: list[tuple[str, str]] = [
    ("THORAX PA", "chest"),
    ("Thorax p.a. stehend", "chest"),
    ("Thorax liegend", "chest"),
    ("Rontgen Thorax", "chest"),
    ("Lunge 2 Eb.", "chest"),
    ("Rippen li", "chest"),
    ("Abdomen leer", "abdomen"),
    ("Abdomenübersicht", "abdomen"),
    ("Becken", "pelvis"),
    ("Beckenübersicht", "pelvis"),
    ("Hüfte re", "pelvis"),
    ("Hüftgelenk li axial", "pelvis"),
    ("Schenkelhals li", "pelvis"),
    ("Oberschenkel re", "leg"),
    ("Knie re", "knee"),
    ("Kniegelenk li 2 Eb.", "knee"),
    ("Unterschenkel li", "leg"),
    ("Sprunggelenk", "ankle"),
    ("OSG li", "ankle"),
    ("Fuß re 2 Eb.", "foot"),
    ("Vorfuß li", "foot"),
    ("Zehen re", "foot"),
    ("Fersenbein", "foot"),
    ("Schulter li", "shoulder"),
    ("Schlüsselbein re", "shoulder"),
    ("Humeruskopf li", "shoulder"),
    ("Oberarm li", "arm"),
    ("Ellenbogen re", "elbow"),
    ("Radiusköpfchen", "elbow"),
    ("Unterarm li", "wrist"),
    ("Handgelenk re", "wrist"),
    ("Kahnbein li", "wrist"),
    ("Hand li 2 Eb.", "hand"),
    ("Finger re", "hand"),
    ("Daumen li", "hand"),
    ("Schädel", "skull"),
    ("Schädel 2 Eb.", "skull"),
    ("Nasennebenhöhlen", "skull"),
    ("Gesichtsschädel", "skull"),
    ("Unterkiefer", "skull"),
    ("HWS", "cspine"),
    ("Halswirbelsäule 2 Eb.", "cspine"),
    ("BWS", "tspine"),
    ("Brustwirbelsäule", "tspine"),
    ("LWS 2 Eb.", "lspine"),
    ("Lendenwirbelsäule", "lspine"),
    ("Kreuzbein", "lspine"),
    ("Mammographie bds.", "breast"),
]

FRENCH: list[tuple[str, str]] = [
    ("Poumons face", "chest"),
    ("Thorax de face", "chest"),
    ("Radio pulmonaire", "chest"),
    ("Gril costal", "chest"),
    ("Abdomen sans préparation", "abdomen"),
    ("Bassin", "pelvis"),
    ("Bassin de face", "pelvis"),
    ("Hanche droite", "pelvis"),
    ("Col du fémur gauche", "pelvis"),
    ("Tête fémorale", "pelvis"),
    ("Fémur droit", "leg"),
    ("Genou droit", "knee"),
    ("Genou face et profil", "knee"),
    ("Rotule", "knee"),
    ("Jambe gauche", "leg"),
    ("Cheville", "ankle"),
    ("Pied gauche", "foot"),
    ("Orteils", "foot"),
    ("Calcanéum", "foot"),
    ("Épaule droite", "shoulder"),
    ("Clavicule gauche", "shoulder"),
    ("Humérus", "arm"),
    ("Bras droit", "arm"),
    ("Coude gauche", "elbow"),
    ("Tête radiale", "elbow"),
    ("Avant-bras droit", "wrist"),
    ("Poignet gauche", "wrist"),
    ("Main gauche", "hand"),
    ("Main droite face", "hand"),
    ("Doigts", "hand"),
    ("Pouce", "hand"),
    ("Crâne", "skull"),
    ("Crâne face profil", "skull"),
    ("Sinus", "skull"),
    ("Massif facial", "skull"),
    ("Rachis cervical", "cspine"),
    ("Rachis dorsal", "tspine"),
    ("Rachis lombaire", "lspine"),
    ("Sacrum", "lspine"),
    ("Mammographie", "breast"),
    ("Sein gauche", "breast"),
]

# Text that names no body part must stay unknown, not borrow a class from a view or a generic word.
NO_PART: list[tuple[str, str]] = [
    ("XR 1 VIEW", "unknown"),
    ("Aufnahme", "unknown"),
    ("PORTABLE", "unknown"),
    ("fell at home", "unknown"),
    ("Face profil", "unknown"),
    ("XR MAIN SERIES", "unknown"),
    ("Radiographie", "unknown"),
]

TABLE = BODY_PART_EXAMINED + ENGLISH + GERMAN + FRENCH + NO_PART


def test_the_table_is_large_enough() -> None:
    assert len(BODY_PART_EXAMINED) >= 80
    assert min(len(ENGLISH), len(GERMAN), len(FRENCH)) >= 30
    assert all(expected in labels.BODY_PARTS for _, expected in TABLE)


@pytest.mark.parametrize(("text", "expected"), TABLE, ids=[text for text, _ in TABLE])
def test_body_part_of_real_world_text(text: str, expected: str) -> None:
    assert labels.body_part_from_text(text) == expected


def test_no_mislabels_over_the_whole_table() -> None:
    wrong = [(text, labels.body_part_from_text(text), expected) for text, expected in TABLE]
    assert [w for w in wrong if w[1] != w[2]] == []


@pytest.mark.parametrize(
    ("text", "wrong_before"),
    [
        ("NECK OF FEMUR", "cspine"),
        ("FEMUR NECK", "cspine"),
        ("FEMORAL HEAD", "skull"),
        ("RADIAL HEAD", "skull"),
        ("HUMERAL HEAD", "skull"),
        ("Knee main", "hand"),
        ("Sinus tarsi", "skull"),
        ("ABDOMENPELVIS", "unknown"),
        ("TLSPINE", "unknown"),
        ("HEADNECK", "unknown"),
        ("TMJ", "unknown"),
        ("ZYGOMA", "unknown"),
        ("Thorax face", "skull"),
    ],
)
def test_the_reported_mislabels_are_gone(text: str, wrong_before: str) -> None:
    assert labels.body_part_from_text(text) != wrong_before
    assert labels.body_part_from_text(text) != labels.UNKNOWN


def test_fields_are_tried_in_order_and_a_term_without_a_class_defers_to_the_next() -> None:
    # Fields are tried in order: the first one that names any part wins (BodyPartExamined first).
    assert labels.normalize_body_part("", "Knee main", "HAND") == "knee"
    assert labels.normalize_body_part("TLSPINE", "XR LUMBAR SPINE") == "tspine"
    assert labels.normalize_body_part("SPINE", "XR LUMBAR SPINE") == "lspine"
    assert labels.normalize_body_part("EXTREMITY", "", "Genou droit") == "knee"


def test_every_rule_names_a_class_of_the_vocabulary() -> None:
    assert {label for label, _ in labels._BODY_PATTERNS} <= set(labels.BODY_PARTS)
    assert set(labels._DEFINED_TERMS.values()) <= set(labels.BODY_PARTS)
