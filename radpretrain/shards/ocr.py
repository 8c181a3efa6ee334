"""Burned-in text screening: OCR on the resized image withholds images whose text is more than allowed markers."""

# Detection runs on the image the sharder already shrank (512 px: ~0.1 s on one core), recognition only inside
# the boxes it found, with rapidocr-onnxruntime (PP-OCRv4 models inside the wheel: nothing is downloaded at run
# time). The recognised text decides and is dropped: only the box coordinates of a withheld image are kept, in
# the private folder.

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from radpretrain import files
from radpretrain.errors import ConfigError
from radpretrain.shards.sample import SkipFile, robust_range

#: The skip reason of a withheld image (a fixed phrase: errors.jsonl and the manifest count it).
REASON = "burned-in text (detected)"
#: Folder in the private folder: one `<file pseudonym>.json` per withheld file with where the text was found.
WITHHELD_DIR = "withheld"
INSTALL_HINT = (
    "--scan-text needs the OCR extra, which is not installed: pip install 'radpretrain[ocr]' "
    "(or pip install rapidocr-onnxruntime)"
)
#: Words that mark side, view and patient position, never a person: they pass the screen.
DEFAULT_MARKERS = (
    "L", "R", "LT", "RT", "LEFT", "RIGHT", "PA", "AP", "LAT", "LATERAL", "LL", "RL", "OBL",
    "OBLIQUE", "PORTABLE", "PORT", "ERECT", "UPRIGHT", "SUPINE", "PRONE", "DECUB", "SITTING", "STANDING",
    "WB", "INSP", "EXP", "FLEX", "EXT",
)  # fmt: skip
#: Characters an arrow drawn as text is made of (OCR reads drawn arrows as these too).
ARROW_CHARS = frozenset("←→↑↓↖↗↘↙⇐⇒⇑⇓<>-=|^v")
#: Round shapes (femoral heads, rings, ECG electrodes) are read as "O", "00", "0.0": up to 3 of these pass.
RING_CHARS = frozenset("0Oo")
_EDGE_PUNCTUATION = ".,:;'\"`()[]{}*_~"


@dataclass
class TextRules:
    """What text may stay in an image: markers, arrows, short tokens without digits and round shapes read as
    "O" or "00"; anything else withholds."""

    markers: list[str] = field(default_factory=lambda: list(DEFAULT_MARKERS))
    #: Tokens up to this many characters without a digit pass (stray letters; "DOE" is 3), and any single one.
    short_max: int = 2
    #: Recognitions below this confidence are noise (anatomy edges read as letters), not text.
    min_score: float = 0.5
    #: The same for upright boxes (vertical text) unless the reading has 4+ different characters: stacked
    #: vertebrae read as "GGGG" at 0.5-0.75.
    min_score_vertical: float = 0.8
    #: Letters-only pieces (4+ letters) of a marker of 5+ letters ("PORTAB", "RECT", "CPORTABLE": anatomy or
    #: another label hid or added a letter) pass too.
    fragments: bool = True

    def validate(self) -> None:
        self.markers = [m.strip().upper() for m in self.markers if m.strip()]
        if self.short_max < 0:
            raise ConfigError(f"text_rules.short_max must be >= 0, got {self.short_max}")
        for name in ("min_score", "min_score_vertical"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"text_rules.{name} must be in [0, 1), got {getattr(self, name)}")

    def allows(self, text: str) -> bool:
        """Whether one recognised line is only markers, arrows and short tokens without digits."""
        markers = frozenset(m.upper() for m in self.markers)
        for raw in text.upper().split():
            token = raw.strip(_EDGE_PUNCTUATION)
            if not token or set(token) <= ARROW_CHARS or _rings(token):
                continue
            if token in markers or _marker_run(token, markers) or (self.fragments and _fragment(token, markers)):
                continue
            if len(token) == 1 or (len(token) <= self.short_max and not any(c.isdigit() for c in token)):
                continue  # one character (a stray digit, an image number) never identifies anyone
            return False
        return True


def _rings(token: str) -> bool:
    """Whether `token` is at most 3 round shapes read as O or 0, maybe with dots between ("00", "0.0")."""
    shapes = [c for c in token if c.isalnum()]
    return 0 < len(shapes) <= 3 and set(shapes) <= RING_CHARS


def _fragment(token: str, markers: frozenset[str]) -> bool:
    """Whether `token` is 4+ letters of a marker of 5+ letters, or such a marker with one letter added at an end
    (3 letters would let names such as "TAN" or "RON" through)."""
    if len(token) < 4 or not token.isalpha():
        return False
    long_markers = [m for m in markers if len(m) >= 5]
    return any(token in m or token[1:] == m or token[:-1] == m for m in long_markers)


def _marker_run(token: str, markers: frozenset[str]) -> bool:
    """Whether `token` is markers written together ("PAERECT": OCR often drops the space between words)."""
    reachable = [True] + [False] * len(token)
    for end in range(1, len(token) + 1):
        reachable[end] = any(reachable[start] and token[start:end] in markers for start in range(end))
    return reachable[-1]


@dataclass
class Finding:
    """What the screen found in one image: the boxes of text that is not allowed, and its cost."""

    boxes: list[list[int]]  # (x0, y0, x1, y1) in the screened image's pixels; empty: the image passes
    detected: int  # text boxes detected (allowed ones included)
    detect_s: float
    recognize_s: float


#: A reading at least this confident is not read again in other turns (upright print scores 0.95-1.0; a
#: sideways "LT" read as "5" scored 0.86).
SURE_SCORE = 0.9


def require_engine() -> None:
    """Fail in one line, saying how to install it, when the OCR library is missing."""
    try:
        import rapidocr_onnxruntime  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None


#: Detection works on the image as the sharder shrank it; only a larger one (--size above this) is shrunk again.
DETECT_MAX_SIDE = 2048

# One engine per process (the worker processes of a run each make their own on their first image): loading
# the three ONNX models takes ~0.4 s, screening an image ~0.3 s.
_ENGINE: list[Any] = []


def engine() -> Any:
    """This process's RapidOCR engine; detection never upscales (RapidOCR's default brings the short side up to
    736 px, 2x the work on a 512 px image)."""
    if not _ENGINE:
        require_engine()
        from rapidocr_onnxruntime import RapidOCR

        _ENGINE.append(
            RapidOCR(
                # One thread: parallelism comes from the worker processes, as for decoding.
                intra_op_num_threads=1,
                inter_op_num_threads=1,
                det_limit_type="max",
                det_limit_side_len=DETECT_MAX_SIDE,
            )
        )
        logging.getLogger("RapidOCR").setLevel(logging.WARNING)
    return _ENGINE[0]


def display_image(stored: np.ndarray) -> np.ndarray:
    """Stored values -> 8-bit BGR over the robust range (burned-in text, usually the brightest value, saturates)."""
    import cv2

    low, high = robust_range(stored)
    scaled = (stored.astype(np.float32) - low) * (255.0 / max(high - low, 1.0))
    grey = np.clip(scaled, 0, 255).astype(np.uint8)
    return np.asarray(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR))


def find_text(stored: np.ndarray, rules: TextRules) -> Finding:
    """Detect text on the image as stored (already resized), recognise only inside the boxes found, and return
    the boxes whose text the rules do not allow. The text itself never leaves this function."""
    image = display_image(stored)
    ocr = engine()
    started = time.perf_counter()
    boxes, _ = ocr.text_det(image)
    detect_s = time.perf_counter() - started
    if boxes is None or len(boxes) == 0:
        return Finding([], 0, detect_s, 0.0)
    started = time.perf_counter()
    crops = ocr.get_crop_img_list(image, list(boxes))
    readings = [(str(text), float(score)) for text, score, *_ in ocr.text_rec(crops)[0]]
    # Vertical text comes out of a tall crop turned a quarter left (RapidOCR's rule), upside down when it read
    # upwards: read tall crops turned over too. A short vertical word ("LT") is not turned at all: where a
    # reading would withhold the image but is not sure, read the crop in the other three turns. A turned reading
    # replaces the first only when it is credible (`_credible`): anatomy read in any turn gives nonsense at 0.5-0.8.
    turns = [
        (2,) if _tall(box) else (1, 2, 3) if rules.min_score <= score < SURE_SCORE and not rules.allows(text) else ()
        for box, (text, score) in zip(boxes, readings, strict=True)
    ]
    turned = [np.ascontiguousarray(np.rot90(crops[i], k)) for i, ks in enumerate(turns) for k in ks]
    if turned:
        others = iter([(str(text), float(score)) for text, score, *_ in ocr.text_rec(turned)[0]])
        for i, ks in enumerate(turns):
            credible = [reading for reading in (next(others) for _ in ks) if _credible(*reading, SURE_SCORE, rules)]
            readings[i] = max([readings[i], *credible], key=lambda reading: reading[1])
    recognize_s = time.perf_counter() - started
    flagged = []
    for box, (text, score) in zip(boxes, readings, strict=True):
        sure = rules.min_score_vertical if _tall(box) else rules.min_score
        if _credible(text, score, sure, rules) and not rules.allows(text):
            points = np.asarray(box, dtype=np.float64)
            x0, y0 = np.floor(points.min(axis=0)).astype(int)
            x1, y1 = np.ceil(points.max(axis=0)).astype(int)
            flagged.append([int(x0), int(y0), int(x1), int(y1)])
    return Finding(flagged, len(boxes), detect_s, recognize_s)


#: `--scan-text` modes: scan nothing, only images whose header does not decide, or every image.
ScanMode = Literal["off", "unflagged", "all"]


#: A reading with at least this many different letters and digits reads as words, not as a repeated shape.
VARIED_CHARS = 4


def _credible(text: str, score: float, sure: float, rules: TextRules) -> bool:
    """Whether a reading is text: `sure` of it, or at least `rules.min_score` with varied characters. Stacked
    vertebrae read as "GGGG" or "seeeee" at 0.5-0.75, a vertical name as "MUEllEr, ElENa" at 0.75."""
    varied = len({c.upper() for c in text if c.isalnum()}) >= VARIED_CHARS
    return score >= sure or (score >= rules.min_score and varied)


def _tall(box: np.ndarray) -> bool:
    """Whether a detected box stands upright (RapidOCR's rule for turning a crop: height >= 1.5 x width)."""
    points = np.asarray(box, dtype=np.float64)
    width = float(max(np.linalg.norm(points[0] - points[1]), np.linalg.norm(points[2] - points[3])))
    height = float(max(np.linalg.norm(points[0] - points[3]), np.linalg.norm(points[1] - points[2])))
    return height >= 1.5 * max(width, 1.0)


def header_decides(flag: Any) -> bool:
    """Whether BurnedInAnnotation settles the question: YES (sharded only with --include-burned-in) or NO."""
    return str(flag or "").strip().upper() in ("YES", "NO")


@dataclass
class TextScreen:
    """The screen as a worker runs it: the mode, the rules and where withheld images are recorded."""

    mode: ScanMode
    rules: TextRules
    private_dir: str

    def screen(self, stored: np.ndarray, file: str, frame: int, header_flag: Any) -> None:
        """Raise SkipFile(REASON) when the image carries text that is not allowed, after recording where."""
        if self.mode == "off" or (self.mode == "unflagged" and header_decides(header_flag)):
            return
        finding = find_text(stored, self.rules)
        if finding.boxes:
            record_withheld(Path(self.private_dir), file, frame, stored.shape, finding.boxes)
            raise SkipFile(REASON)


def screen_for(mode: ScanMode, rules: TextRules, private_dir: str | Path) -> TextScreen | None:
    """The screen a run's workers apply, None when the mode is off."""
    return None if mode == "off" else TextScreen(mode, rules, str(private_dir))


def _record_path(private_dir: Path, file: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]+", file):  # pseudonyms are hex; anything else must not name a file
        raise ValueError("a file pseudonym must be hexadecimal")
    return private_dir / WITHHELD_DIR / f"{file}.json"


def record_withheld(private_dir: Path, file: str, frame: int, shape: tuple[int, ...], boxes: list[list[int]]) -> None:
    """Write where the text was found (boxes in the screened image, never the text) to the private folder."""
    path = _record_path(private_dir, file)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    record = {"file": file, "frame": frame, "shape": [int(s) for s in shape[:2]], "boxes": boxes}
    files.write_text(path, json.dumps(record, separators=(",", ":")) + "\n")


def read_withheld(private_dir: str | Path, file: str) -> dict[str, Any] | None:
    """The record of one withheld file, None when there is none (or it is unreadable)."""
    try:
        return dict(json.loads(_record_path(Path(private_dir), file).read_text()))
    except (OSError, ValueError):
        return None
