"""Synthetic radiographs with burned-in identifiers (names, dates, IDs) or only side and view markers."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from radpretrain.synth.archive import _FIRST_F, _FIRST_M, _LAST

#: OpenCV's Hershey fonts that read as print (the script faces are not what scanners and modalities burn in).
FONTS = ("SIMPLEX", "DUPLEX", "COMPLEX", "TRIPLEX", "PLAIN", "COMPLEX_SMALL")
#: What a clean image may carry: lead side markers, view and position words.
MARKERS = ("L", "R", "LT", "RT", "PA", "AP", "LAT", "PORTABLE", "ERECT", "SUPINE")
BODY_PARTS = ("chest", "hand", "knee", "pelvis", "skull", "lspine", "foot", "shoulder", "abdomen")
#: Cap heights (pixels in the image the screen sees) drawn by default: the target range starts at 12 px.
TEXT_PX = (12, 32)


@dataclass
class BurnedIn:
    """One synthetic image as the screen sees it (already resized) and what was drawn into it."""

    image: np.ndarray  # uint16, MONOCHROME2 (higher = more attenuation), long side `size`
    phi: bool  # identifying text was drawn
    texts: list[str] = field(default_factory=list)  # every string drawn, markers included
    text_px: list[float] = field(default_factory=list)  # cap height of each string, in `image` pixels
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # (x0, y0, x1, y1) of each, in `image`
    angles: list[float] = field(default_factory=list)  # rotation of each string in degrees (0: horizontal)


def phi_lines(rng: np.random.Generator) -> list[str]:
    """One to three lines of the identifiers a modality or scanner burns in: name, birth or study date, IDs."""
    first = str(rng.choice(_FIRST_M + _FIRST_F)).upper()
    last = str(rng.choice(_LAST)).upper().replace("Ü", "UE")
    birth = dt.date(1925, 1, 1) + dt.timedelta(days=int(rng.integers(0, 33000)))
    study = dt.date(2001, 1, 1) + dt.timedelta(days=int(rng.integers(0, 9000)))
    day = birth if rng.random() < 0.5 else study
    number = int(rng.integers(10000, 99999999))
    names = (f"{last}^{first}", f"{last}, {first}", f"{first} {last}", f"{last} {first[0]}.")
    dates = (
        day.isoformat(),
        day.strftime("%d.%m.%Y"),
        day.strftime("%m/%d/%Y"),
        day.strftime("%d %b %Y").upper(),
        day.strftime("%Y%m%d"),
    )
    ids = (f"MRN {number}", f"ID: {number:08d}", f"ACC {study.year}-{number % 1000000:06d}", f"PID {number}")
    choices = [str(rng.choice(names)), str(rng.choice(dates)), str(rng.choice(ids))]
    count = int(rng.integers(1, 4))
    picked = [choices[i] for i in sorted(rng.choice(3, size=count, replace=False))]
    if count > 1 and rng.random() < 0.4:  # one line "NAME 1931-04-17", as many CR readers print it
        return [" ".join(picked[:2]), *picked[2:]]
    return picked


def make_image(
    rng: np.random.Generator,
    phi: bool,
    size: int = 512,
    text_px: tuple[float, float] = TEXT_PX,
    rotate: float = 0.25,
) -> BurnedIn:
    """A radiograph of a random body part, drawn at twice `size` and shrunk to `size` as the sharder does.

    PHI images get identifying lines (and sometimes markers too); clean ones get one to three markers. Text
    varies in font, cap height (uniform in `text_px`, measured after shrinking), polarity, contrast against its
    surroundings, an optional dark label box, position and, for a share `rotate` of strings, rotation (small
    tilts, and vertical text along an edge).
    """
    from radpretrain.shards.dicom import resize_longest
    from radpretrain.synth.phantoms import make_radiograph

    scale = 2
    part = str(rng.choice(BODY_PARTS))
    raw, _ = make_radiograph(part, float(rng.uniform(8, 90)), str(rng.choice(["M", "F"])), size * scale, rng)
    image = raw.astype(np.float32) / 4095.0
    markers = [str(m) for m in rng.choice(MARKERS, size=int(rng.integers(1, 4)), replace=False)]
    texts = phi_lines(rng) + (markers[:1] if rng.random() < 0.5 else []) if phi else markers
    result = BurnedIn(image=np.zeros(0, np.uint16), phi=phi)
    taken: list[tuple[int, int, int, int]] = []
    for text in texts:
        height = float(rng.uniform(*text_px))
        angle = 0.0
        if rng.random() < rotate:
            angle = float(rng.choice([90.0, -90.0])) if rng.random() < 0.3 else float(rng.uniform(-12, 12))
        box = burn_text(image, text, height * scale, rng, angle=angle, taken=taken)
        if box is None:
            continue
        taken.append(box)
        result.texts.append(text)
        result.text_px.append(height)
        result.angles.append(angle)
        result.boxes.append(tuple(v // scale for v in box))  # type: ignore[arg-type]
    if not any(t not in MARKERS for t in result.texts):
        result.phi = False  # nothing identifying fitted (never happens at the default sizes)
    if phi and not result.phi:
        return make_image(rng, phi, size, text_px, rotate)
    stored = np.clip(image * 4095.0, 0, 4095).astype(np.uint16)
    result.image = resize_longest(stored, size)
    return result


def burn_text(
    image: np.ndarray,
    text: str,
    cap_px: float,
    rng: np.random.Generator,
    *,
    angle: float = 0.0,
    taken: list[tuple[int, int, int, int]] | None = None,
    contrast: float | None = None,
    font: str | None = None,
) -> tuple[int, int, int, int] | None:
    """Draw `text` with cap height `cap_px` into a [0, 1] attenuation image, somewhere not `taken`; return its
    box (x0, y0, x1, y1), or None where it fits nowhere. Font, contrast and placement are drawn from `rng`
    unless given."""
    import cv2

    taken = taken or []
    face = getattr(cv2, f"FONT_HERSHEY_{font or rng.choice(FONTS)}")
    face |= cv2.FONT_ITALIC if font is None and rng.random() < 0.15 else 0
    reference, _ = cv2.getTextSize("H", face, 1.0, 1)
    font_scale = cap_px / max(reference[1], 1)
    thickness = max(1, round(font_scale * float(rng.uniform(1.0, 2.2))))
    (width, height), baseline = cv2.getTextSize(text, face, font_scale, thickness)
    pad = max(2, int(0.35 * height))
    patch = np.zeros((height + baseline + 2 * pad, width + 2 * pad), np.uint8)
    cv2.putText(patch, text, (pad, pad + height), face, font_scale, 255, thickness, cv2.LINE_AA)
    if angle:
        patch = _rotated(patch, angle)
    rows, cols = image.shape
    ph, pw = patch.shape
    if ph >= rows or pw >= cols:
        return None
    for _ in range(40):
        # Corners and edges first, as modalities place their labels; anywhere for a quarter of strings.
        if rng.random() < 0.75:
            y = int(rng.choice([rng.uniform(0, 0.15), rng.uniform(0.8, 1.0)]) * (rows - ph))
            x = int(rng.uniform(0, 1) * (cols - pw))
        else:
            y, x = int(rng.uniform(0, 1) * (rows - ph)), int(rng.uniform(0, 1) * (cols - pw))
        box = (x, y, x + pw, y + ph)
        if not any(_overlap(box, other) for other in taken):
            break
    else:
        return None
    alpha = patch.astype(np.float32) / 255.0
    region = image[y : y + ph, x : x + pw]
    local = float(np.median(region))
    if rng.random() < 0.3:  # a dark label box behind white text, as secondary captures draw it
        region[:] = region * 0.15
        local = float(np.median(region))
    contrast = float(rng.uniform(0.25, 1.0)) if contrast is None else contrast
    # Bright text where it fits in the range, dark text on bright ground otherwise (and for a fifth of strings).
    bright, dark = local + contrast, local - contrast
    if bright <= 1.0 and not (dark >= 0.0 and rng.random() < 0.2):
        value = bright
    elif dark >= 0.0:
        value = dark
    else:
        value = 1.0 if local < 0.5 else 0.0
    region[:] = region * (1 - alpha) + value * alpha
    return box


def _rotated(patch: np.ndarray, angle: float) -> np.ndarray:
    """The patch turned by `angle` degrees on a canvas large enough to hold it."""
    import cv2

    if angle in (90.0, -90.0):
        return np.ascontiguousarray(np.rot90(patch, 1 if angle > 0 else -1))
    h, w = patch.shape
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    nw, nh = int(h * sin + w * cos) + 1, int(h * cos + w * sin) + 1
    matrix[0, 2] += nw / 2 - w / 2
    matrix[1, 2] += nh / 2 - h / 2
    return np.asarray(cv2.warpAffine(patch, matrix, (nw, nh), flags=cv2.INTER_LINEAR))


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def corpus(n: int, seed: int = 0, phi_share: float = 0.5, **kwargs: Any) -> list[BurnedIn]:
    """`n` images, a share `phi_share` of them with identifiers (the first ones), the same for the same seed."""
    rng = np.random.default_rng(seed)
    count = round(n * phi_share)
    return [make_image(rng, i < count, **kwargs) for i in range(n)]
