"""Anatomy-like radiograph phantoms per body part, with age- and sex-dependent appearance and masks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from radpretrain.shards import labels

# Every table below is keyed by body-part names of the one vocabulary, `radpretrain.shards.labels.BODY_PARTS`
# (checked at import); `BODY_PARTS`, the parts with a phantom, is defined after the phantom table.

#: Adult detector field of view (height_mm, width_mm) per body part, as the usual cassette sizes.
FIELD_MM: dict[str, tuple[float, float]] = {
    "chest": (430.0, 360.0),
    "abdomen": (430.0, 350.0),
    "pelvis": (350.0, 430.0),
    "skull": (300.0, 240.0),
    "lspine": (430.0, 300.0),
    "shoulder": (240.0, 300.0),
    "hand": (300.0, 240.0),
    "knee": (300.0, 240.0),
    "foot": (300.0, 240.0),
}

#: Which ground-truth masks each body part can produce.
MASK_STRUCTURES: dict[str, tuple[str, ...]] = {"chest": ("lungs", "heart"), "hand": ("bones",), "knee": ("bones",)}

#: Parts with a side (drawn as a right limb, mirrored for the left).
SIDED: frozenset[str] = frozenset({"hand", "knee", "foot", "shoulder"})

#: Lung findings a chest phantom can carry (`make_radiograph(..., finding=...)`); its mask is named "finding".
FINDINGS: tuple[str, ...] = ("nodule", "consolidation")
FINDING_MASK = "finding"

_SHIFT = 4  # cv2 fixed-point bits: sub-pixel drawing keeps thin bones smooth at low working resolution
_ONE = 1 << _SHIFT
_WORK_LONG_SIDE = 384  # drawing resolution; the result is resized up and detector noise added there

Point = tuple[float, float]


@dataclass(frozen=True)
class Body:
    """Age- and sex-dependent proportions of one patient."""

    age: float
    sex: str | None

    @property
    def female(self) -> bool:
        return self.sex == "F"

    @property
    def scale(self) -> float:
        """Body size relative to an adult (about 1/3 at birth)."""
        size = float(np.interp(self.age, [0, 1, 2, 5, 10, 14, 18], [0.33, 0.42, 0.48, 0.6, 0.75, 0.9, 1.0]))
        return size * (0.94 if self.female and self.age >= 12 else 1.0)

    @property
    def density(self) -> float:
        """Bone mineral density relative to a young adult; falls faster in women after menopause."""
        dens = float(np.interp(self.age, [0, 2, 10, 20, 45, 70, 90], [0.5, 0.6, 0.8, 1.0, 1.0, 0.78, 0.62]))
        if self.female and self.age > 50:
            dens -= 0.004 * (self.age - 50)
        return dens

    @property
    def cortex(self) -> float:
        """Cortical thickness as a fraction of bone width (thins with age)."""
        return float(np.interp(self.age, [0, 20, 50, 90], [0.18, 0.3, 0.27, 0.14]))

    def plate(self, fuse_age: float) -> float:
        """How open a growth plate that fuses at `fuse_age` (boys; girls 1.5 years earlier) is: 1 open, 0 fused."""
        fuse = fuse_age - (1.5 if self.female else 0.0)
        return float(np.clip((fuse - self.age) / 1.5, 0.0, 1.0))

    def ossified(self, onset: float) -> float:
        """Size (0..1) of an ossification centre that appears at `onset` years (girls earlier)."""
        onset = onset * (0.8 if self.female else 1.0)
        if self.age < onset:
            return 0.0
        return float(np.clip(0.35 + (self.age - onset) / 4.0, 0.35, 1.0))


class Canvas:
    """Additive attenuation layers drawn in millimetres around the image centre, with a patient pose."""

    LAYERS = ("soft", "organ", "vessel", "bone")

    def __init__(self, shape: tuple[int, int], mm_per_px: float, rotation_deg: float, shift_mm: Point) -> None:
        self.shape = shape
        self.px_per_mm = 1.0 / mm_per_px
        self.layers = {name: np.zeros(shape, np.float32) for name in self.LAYERS}
        self.masks: dict[str, np.ndarray] = {}
        self._tmp = np.zeros(shape, np.float32)
        theta = math.radians(rotation_deg)
        self.rotation = rotation_deg
        self._cos, self._sin = math.cos(theta), math.sin(theta)
        self._cx = shape[1] / 2.0 + shift_mm[0] * self.px_per_mm
        self._cy = shape[0] / 2.0 + shift_mm[1] * self.px_per_mm

    def px(self, points: Sequence[Point]) -> np.ndarray:
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        x = pts[:, 0] * self._cos - pts[:, 1] * self._sin
        y = pts[:, 0] * self._sin + pts[:, 1] * self._cos
        return np.stack([self._cx + x * self.px_per_mm, self._cy + y * self.px_per_mm], axis=1)

    def mm(self, points_px: np.ndarray) -> np.ndarray:
        """The inverse of `px`: pixel positions (N, 2) back to millimetres in the patient's frame."""
        pts = np.asarray(points_px, np.float64).reshape(-1, 2)
        dx = (pts[:, 0] - self._cx) / self.px_per_mm
        dy = (pts[:, 1] - self._cy) / self.px_per_mm
        return np.stack([dx * self._cos + dy * self._sin, -dx * self._sin + dy * self._cos], axis=1)

    def _stamp(
        self,
        points_px: np.ndarray,
        reach_px: float,
        draw: Callable[[np.ndarray, np.ndarray], None],
        value: float,
        layer: str,
        mask: str | None,
    ) -> None:
        # Draw into a zeroed region of interest only, then add: cost follows the shape's size.
        rows, cols = self.shape
        x0 = max(int(points_px[:, 0].min() - reach_px) - 2, 0)
        y0 = max(int(points_px[:, 1].min() - reach_px) - 2, 0)
        x1 = min(int(points_px[:, 0].max() + reach_px) + 3, cols)
        y1 = min(int(points_px[:, 1].max() + reach_px) + 3, rows)
        if x1 <= x0 or y1 <= y0:
            return
        roi = self._tmp[y0:y1, x0:x1]
        roi.fill(0.0)
        fixed = np.round((points_px - [x0, y0]) * _ONE).astype(np.int32)
        draw(roi, fixed)
        target = self.layers[layer][y0:y1, x0:x1]
        target += np.float32(value) * roi
        if mask is not None:
            full = self.masks.setdefault(mask, np.zeros(self.shape, bool))
            full[y0:y1, x0:x1] |= roi > 0.5

    def ellipse(
        self,
        center: Point,
        axes: Point,
        angle: float,
        value: float,
        layer: str = "bone",
        mask: str | None = None,
        thickness: float | None = None,
        arc: tuple[float, float] = (0.0, 360.0),
    ) -> None:
        c = self.px([center])
        ax = (max(int(axes[0] * self.px_per_mm * _ONE), 1), max(int(axes[1] * self.px_per_mm * _ONE), 1))
        thick = -1 if thickness is None else max(round(thickness * self.px_per_mm), 1)
        reach = max(axes) * self.px_per_mm + (thickness or 0) * self.px_per_mm

        def draw(roi: np.ndarray, fixed: np.ndarray) -> None:
            center_fixed = (int(fixed[0, 0]), int(fixed[0, 1]))
            cv2.ellipse(roi, center_fixed, ax, angle + self.rotation, arc[0], arc[1], 1.0, thick, cv2.LINE_AA, _SHIFT)

        self._stamp(c, reach, draw, value, layer, mask)

    def capsule(
        self, p1: Point, p2: Point, width: float, value: float, layer: str = "bone", mask: str | None = None
    ) -> None:
        self.polyline([p1, p2], width, value, layer, mask)

    def polyline(
        self, points: Sequence[Point], width: float, value: float, layer: str = "bone", mask: str | None = None
    ) -> None:
        pts = self.px(points)
        thick = max(round(width * self.px_per_mm), 1)

        def draw(roi: np.ndarray, fixed: np.ndarray) -> None:
            cv2.polylines(roi, [fixed], False, 1.0, thick, cv2.LINE_AA, _SHIFT)

        self._stamp(pts, width * self.px_per_mm / 2 + 1, draw, value, layer, mask)

    def polygon(self, points: Sequence[Point], value: float, layer: str = "bone", mask: str | None = None) -> None:
        pts = self.px(points)

        def draw(roi: np.ndarray, fixed: np.ndarray) -> None:
            cv2.fillPoly(roi, [fixed], 1.0, cv2.LINE_AA, _SHIFT)

        self._stamp(pts, 1.0, draw, value, layer, mask)

    def bone(
        self, p1: Point, p2: Point, width: float, body: Body, density: float = 0.45, mask: str | None = "bones"
    ) -> None:
        """A tubular bone: a dense cortex shell around a lighter medulla, as a projected hollow cylinder shows."""
        dens = density * body.density
        self.capsule(p1, p2, width, dens, "bone", mask)
        self.capsule(p1, p2, width * (1.0 - 2.0 * body.cortex), -dens * 0.45, "bone", None)

    def blob(self, center: Point, axes: Point, angle: float, body: Body, density: float = 0.4, mask: str | None = None):
        """A compact bone (carpal, tarsal, epiphysis, vertebral body) with a bright rim."""
        dens = density * body.density
        self.ellipse(center, axes, angle, dens, "bone", mask)
        rim = 1.0 - 1.6 * body.cortex
        self.ellipse(center, (axes[0] * rim, axes[1] * rim), angle, -dens * 0.35, "bone", None)

    def dome(self, center: Point, axes: Point, angle: float, value: float, layer: str = "soft", steps: int = 6) -> None:
        """A projected ellipsoid (breast, heart): thickest in the middle, thinning smoothly to its outline."""
        for k in range(steps):
            shrink = math.sqrt(1.0 - (k / steps) ** 2)
            self.ellipse(center, (axes[0] * shrink, axes[1] * shrink), angle, value / steps, layer)

    def fill(self, name: str, value: float, layer: str = "soft") -> None:
        """Add the union of the shapes drawn into mask `name` once (overlaps must not double the tissue)."""
        self.layers[layer] += np.float32(value) * self.masks.pop(name).astype(np.float32)

    def solid(self, name: str, body: Body, density: float, mask: str | None = "bones") -> None:
        """Turn the shapes drawn into mask `name` into one bone of any outline, with a cortical rim."""
        shape_mask = self.masks.pop(name)
        dens = density * body.density
        filled = shape_mask.astype(np.float32)
        self.layers["bone"] += dens * filled
        rim_px = max(round(body.cortex * 9.0 * self.px_per_mm), 1)
        inner = cv2.erode(shape_mask.astype(np.uint8), np.ones((2 * rim_px + 1, 2 * rim_px + 1), np.uint8))
        self.layers["bone"] -= 0.35 * dens * inner.astype(np.float32)
        if mask is not None:
            full = self.masks.setdefault(mask, np.zeros(self.shape, bool))
            full |= shape_mask

    def render(self, mm_per_px: float) -> np.ndarray:
        """Round off the soft tissue, blur each layer by its own sharpness and sum them into attenuation."""
        soft = self.layers["soft"]
        body = (soft > 0.05).astype(np.uint8)
        if body.any():
            # A limb or trunk is roughly a cylinder: its projected thickness falls off towards the edges.
            # Without any background pixel the transform returns huge distances: cap before scaling.
            depth_mm = np.minimum(cv2.distanceTransform(body, cv2.DIST_L2, 3), 1e4) * np.float32(mm_per_px)
            soft *= np.sqrt(np.clip(depth_mm / 12.0, 0.0, 1.0))
        out = np.zeros(self.shape, np.float32)
        for name, sigma_mm in (("soft", 2.5), ("organ", 1.8), ("vessel", 0.8), ("bone", 0.45)):
            sigma = max(sigma_mm / mm_per_px, 0.3)
            out += cv2.GaussianBlur(self.layers[name], (0, 0), sigma)
        return out


def _jitter(rng: np.random.Generator, points: Sequence[Point], mm: float) -> list[Point]:
    noise = rng.uniform(-mm, mm, size=(len(points), 2))
    return [(float(x + dx), float(y + dy)) for (x, y), (dx, dy) in zip(points, noise, strict=True)]


def _mirror(points: Sequence[Point]) -> list[Point]:
    return [(-x, y) for x, y in points]


def _scaled(points: Sequence[Point], s: float, sx: float = 1.0) -> list[Point]:
    return [(x * s * sx, y * s) for x, y in points]


def _along(origin: Point, angle_deg: float, dist: float) -> Point:
    """The point `dist` mm from `origin` in direction `angle_deg` (0 = up the image, positive = clockwise)."""
    a = math.radians(angle_deg)
    return (origin[0] + dist * math.sin(a), origin[1] - dist * math.cos(a))


def _ray(
    c: Canvas,
    body: Body,
    base: Point,
    angle: float,
    lengths: Sequence[float],
    widths: Sequence[float],
    epiphysis_at: Sequence[str],
    onset: float,
    fuse_age: float,
    gap: float,
    density: float = 0.45,
) -> None:
    """A chain of tubular bones (a finger or toe ray) with joints and, in children, epiphyses and growth plates.

    `epiphysis_at[i]` is "base", "head" or "" for bone i; the epiphysis is drawn only once ossified.
    """
    pos = base
    plate = body.plate(fuse_age)
    size = body.ossified(onset)
    for length, width, where in zip(lengths, widths, epiphysis_at, strict=True):
        if length <= 0:
            continue
        start, end = pos, _along(pos, angle, length)
        if where and plate > 0:
            # Open plate: the epiphysis is a separate, smaller centre beyond a dark cartilage gap.
            epi_len = min(0.18 * length, 6.0 * body.scale + 1.0)
            plate_gap = (0.8 + 1.4 * plate) * body.scale + 0.3
            if where == "base":
                shaft_start = _along(start, angle, epi_len + plate_gap)
                c.bone(shaft_start, end, width, body, density)
                if size > 0:
                    centre = _along(start, angle, epi_len / 2)
                    c.blob(centre, (width * 0.5 * size, epi_len * 0.5 * size), angle, body, density, "bones")
            else:
                shaft_end = _along(end, angle, -(epi_len + plate_gap))
                c.bone(start, shaft_end, width, body, density)
                if size > 0:
                    centre = _along(end, angle, -epi_len / 2)
                    c.blob(centre, (width * 0.5 * size, epi_len * 0.5 * size), angle, body, density, "bones")
        else:
            c.bone(start, end, width, body, density)
        pos = _along(end, angle, gap)


# --- body parts -------------------------------------------------------------------------------------------


def _chest(c: Canvas, b: Body, rng: np.random.Generator) -> None:
    s = b.scale
    child = float(np.clip((12 - b.age) / 12, 0, 1))
    wide = rng.uniform(0.92, 1.08)
    # Torso, neck and arms as one soft-tissue mass.
    torso: list[Point] = [(-45, -300), (45, -300), (60, -200), (150, -185), (205, -140), (190, -20), (180, 300)]
    torso = torso + _mirror(torso[::-1])
    c.polygon(_scaled(_jitter(rng, torso, 5), s, wide), 0.55, "soft")
    if rng.random() < 0.6:
        for side in (-1, 1):
            c.capsule((side * 230 * s * wide, -140 * s), (side * 240 * s * wide, 260 * s), 75 * s, 0.45, "soft")
    if b.female and b.age >= 14:
        r = rng.uniform(50, 90) * s
        for side in (-1, 1):
            c.dome((side * 95 * s * wide, 75 * s), (r, r * 0.8), 0, 0.1, "organ")
    # Lungs (air lowers attenuation); the left lung's dome sits lower.
    right = [(-55, -170), (-100, -150), (-135, -105), (-152, -40), (-160, 30), (-162, 95), (-155, 118)]
    right += [(-120, 92), (-80, 74), (-45, 78), (-30, 60), (-24, 0), (-28, -70), (-36, -140)]
    left = [(-x, y + (12 if y > 40 else 0)) for x, y in right]
    lung_drop = 0.24 + 0.04 * child
    lungs_mask = np.zeros(c.shape, bool)
    for poly in (right, left):
        c.polygon(_scaled(_jitter(rng, poly, 4), s, wide), -lung_drop, "organ", "_lung")
        lungs_mask |= c.masks.pop("_lung")
    # Heart: relatively larger in children (cardiothoracic ratio about 0.6 in infants).
    heart_w = (68 + 14 * child) * rng.uniform(0.9, 1.12)
    heart_centre = (28 * s * wide, 55 * s)
    c.ellipse(heart_centre, (heart_w * s, 58 * s), -25, 0.02, "organ", "heart")
    c.dome(heart_centre, (heart_w * s, 58 * s), -25, 0.05, "organ")
    heart = c.masks["heart"]
    # Remove the heart from the lung fields in pixels too: the lungs there are hidden behind it.
    overlap = lungs_mask & heart
    c.layers["organ"][overlap] += lung_drop
    c.masks["lungs"] = lungs_mask & ~heart
    # Pulmonary vessels branch out from the hila and fade towards the periphery.
    for side in (-1, 1):
        hilum = (side * 50 * s * wide, -15 * s)
        for _ in range(int(rng.integers(7, 11))):
            start = (hilum[0] + rng.uniform(-8, 8) * s, hilum[1] + rng.uniform(-25, 25) * s)
            _vessel_tree(c, start, float(side * rng.uniform(20, 170)), 110 * s, 3.5 * s, rng, depth=3)
    c.layers["vessel"] *= c.masks["lungs"].astype(np.float32)
    if b.age < 3:  # thymus widens the upper mediastinum in infants
        c.ellipse((-18 * s, -95 * s), (45 * s, 40 * s), 10, 0.18, "organ")
    c.capsule((0, -300 * s), (0, -105 * s), 17 * s, -0.12, "organ")  # trachea
    c.ellipse((24 * s, -105 * s), (20 * s, 15 * s), 0, 0.05, "organ")  # aortic knob
    if b.age > 60 and rng.random() < 0.7:
        c.ellipse((24 * s, -105 * s), (18 * s, 13 * s), 0, 0.25, "bone", thickness=2.5, arc=(180, 330))
    # Thoracic spine behind the mediastinum.
    for k in range(16):
        y = (-290 + k * 30) * s
        c.ellipse((0, y), (19 * s, 12 * s), 0, 0.07 * b.density, "bone")
        for side in (-1, 1):
            c.ellipse((side * 12 * s, y - 3 * s), (4 * s, 6 * s), 0, 0.05 * b.density, "bone", thickness=1.5 * s)
    # Clavicles and ribs.
    for side in (-1, 1):
        c.bone((side * 25 * s, -170 * s), (side * 160 * s * wide, -205 * s), 17 * s, b, 0.3, None)
        c.bone((side * 160 * s * wide, -205 * s), (side * 180 * s * wide, -190 * s), 14 * s, b, 0.3, None)
        for i in range(10):
            y0 = (-190 + i * (24 - 3 * child)) * s
            reach = (150 * math.sin(math.pi * (0.28 + 0.55 * (i + 1) / 10)) + 5) * s * wide
            drop = (60 - 30 * child) * s
            ts = np.linspace(0, 1, 9)
            posterior = [(side * (14 * s + reach * t), y0 - 8 * s * t + drop * t * t) for t in ts]
            width = (9 - 2 * child) * s
            c.polyline(posterior, width, 0.07 * b.density, "bone")
            for edge in (-0.4, 0.4):  # cortical margins make a rib's borders brighter than its middle
                c.polyline([(x, y + edge * width) for x, y in posterior], 1.2 * s, 0.05 * b.density, "bone")
            end = posterior[-1]
            anterior = [
                (end[0] - side * reach * t * 0.7, end[1] + 8 * s * t + (40 - 10 * child) * s * math.sin(t * 1.4))
                for t in ts
            ]
            c.polyline(anterior, 7 * s, 0.035 * b.density, "bone")
        # Scapula edge and humeral head at the upper corners.
        c.polyline([(side * 120 * s, -185 * s), (side * 150 * s, -60 * s)], 4 * s, 0.12 * b.density, "bone")
        if b.age > 0.5:
            c.blob((side * 205 * s * wide, -175 * s), (27 * s, 27 * s), 0, b, 0.35)


def _vessel_tree(
    c: Canvas, start: Point, angle: float, length: float, width: float, rng: np.random.Generator, depth: int
) -> None:
    """A branching vessel: a slightly curving trunk that splits into thinner, shorter branches."""
    pos = start
    points = [pos]
    for _ in range(4):
        angle += float(rng.normal(0, 8))
        pos = _along(pos, angle, length / 4)
        points.append(pos)
    c.polyline(points, width, 0.05, "vessel")
    if depth > 0:
        for k in range(1, 4):
            if rng.random() < 0.6:
                fork = points[k]
                _vessel_tree(
                    c,
                    fork,
                    angle + float(rng.choice([-1, 1]) * rng.uniform(20, 45)),
                    length * 0.55,
                    width * 0.6,
                    rng,
                    depth - 1,
                )


# --- lung findings ------------------------------------------------------------------------------------------

# Sizes in mm and densities in attenuation units. A nodule is a rounded opacity of up to 30 mm (larger is a
# mass); below about 8 mm radiographs rarely show one. Its peak density grows with its diameter, as the chord
# of tissue that replaces air does; per mm a solid nodule weighs about as much as the phantom's vessels.
_NODULE_MM = (10.0, 30.0)
_NODULE_PER_MM = (0.004, 0.006)
# A consolidation fills a segment to a lobe (extent in mm, adult, before the lung's outline cuts it): fluid in
# 60-90 % of the airspace along the beam, patchily, takes back most of the lungs' attenuation drop (0.24).
_CONSOLIDATION_MM = (50.0, 110.0)
_CONSOLIDATION_DENSITY = (0.14, 0.22)


def draw_finding(c: Canvas, b: Body, kind: str, rng: np.random.Generator) -> None:
    """Draw a lung finding of `kind` (`FINDINGS`) inside the lungs drawn so far (mask "lungs"), with its mask."""
    if kind not in FINDINGS:
        raise ValueError(f"unknown finding '{kind}'; known: {', '.join(FINDINGS)}")
    if "lungs" not in c.masks or not c.masks["lungs"].any():
        raise ValueError("a lung finding needs lungs: draw it on a chest phantom")
    if kind == "nodule":
        _nodule(c, rng)
    else:
        _consolidation(c, b, rng)


def _lung_site(c: Canvas, radius_mm: float, rng: np.random.Generator) -> tuple[Point, float]:
    """A random point in the lungs at least `radius_mm` inside their outline (the heart border and the image
    edge included), and the radius that fits there: smaller where the lungs are too narrow (infants)."""
    lungs = np.pad(c.masks["lungs"].astype(np.uint8), 1)  # the image edge counts as outside
    # Less a pixel and a half: the drawn outline is antialiased and the site jittered by half a pixel.
    depth_mm = (cv2.distanceTransform(lungs, cv2.DIST_L2, 3)[1:-1, 1:-1] - 1.5) / np.float32(c.px_per_mm)
    radius = max(min(radius_mm, float(depth_mm.max())), 0.5 / c.px_per_mm)
    rows, cols = np.nonzero(depth_mm >= min(radius, float(depth_mm.max())))
    k = int(rng.integers(len(rows)))
    x, y = c.mm(np.array([[cols[k], rows[k]]], np.float64) + rng.uniform(-0.5, 0.5, size=(1, 2)))[0]
    return (float(x), float(y)), radius


def _within(c: Canvas, layer: str, region: np.ndarray, draw: Callable[[], None], cap: float | None = None) -> None:
    """Run `draw` (Canvas calls on `layer`) and keep what it added only inside `region`, capped at `cap`."""
    target = c.layers[layer]
    before = target.copy()
    draw()
    added = target - before
    if cap is not None:
        np.clip(added, -cap, cap, out=added)
    target[:] = before + added * region.astype(np.float32)


def _nodule(c: Canvas, rng: np.random.Generator) -> None:
    """A solid pulmonary nodule: a projected sphere, densest at its centre, sometimes with a lobulated edge."""
    diameter = float(rng.uniform(*_NODULE_MM))
    centre, radius = _lung_site(c, diameter / 2, rng)
    value = float(rng.uniform(*_NODULE_PER_MM)) * 2 * radius
    angle = float(rng.uniform(0, 180))
    axes = (radius, radius * float(rng.uniform(0.8, 1.0)))
    c.ellipse(centre, axes, angle, 0.0, "organ", FINDING_MASK)
    c.dome(centre, axes, angle, value, "organ")
    for _ in range(int(rng.integers(0, 3))):  # lobules bulging from the edge
        lobule = _along(centre, float(rng.uniform(0, 360)), radius * 0.6)
        c.dome(lobule, (radius * 0.45, radius * 0.45), 0, value * 0.4, "organ")


def _consolidation(c: Canvas, b: Body, rng: np.random.Generator) -> None:
    """Airspace consolidation: confluent patchy opacities that stop at the lung's outline and the heart border,
    crossed by air bronchograms (bronchi that stay dark inside the opacified lung)."""
    extent = float(rng.uniform(*_CONSOLIDATION_MM)) * b.scale
    centre, extent = _lung_site(c, extent * 0.5, rng)
    extent *= 2
    density = float(rng.uniform(*_CONSOLIDATION_DENSITY))
    lungs = c.masks["lungs"]

    def patches() -> None:
        for _ in range(int(rng.integers(8, 15))):
            dx, dy = rng.normal(0.0, extent * 0.35, size=2)
            size = extent * float(rng.uniform(0.3, 0.55))
            axes = (size, size * float(rng.uniform(0.6, 1.0)))
            where = (centre[0] + float(dx), centre[1] + float(dy))
            c.ellipse(where, axes, float(rng.uniform(0, 180)), density * 0.4, "organ", "_consolidation")

    _within(c, "organ", lungs, patches, cap=density)
    region = c.masks.pop("_consolidation") & lungs
    c.masks[FINDING_MASK] = region

    def bronchi() -> None:
        for _ in range(int(rng.integers(2, 5))):
            start = _along(centre, float(rng.uniform(0, 360)), extent * float(rng.uniform(0.0, 0.4)))
            angle = float(rng.uniform(0, 360))
            points = [start]
            for _ in range(3):
                angle += float(rng.normal(0, 15))
                points.append(_along(points[-1], angle, extent * 0.3))
            c.polyline(points, 2.5 * b.scale + 1.0, -density * 0.5, "vessel")

    _within(c, "vessel", region, bronchi)


def _vertebra(c: Canvas, b: Body, centre: Point, w: float, h: float, density: float = 0.3) -> None:
    """A lumbar vertebra seen AP: body with end plates, pedicle rings, spinous and transverse processes."""
    x, y = centre
    c.blob((x, y), (w / 2, h / 2), 0, b, density)
    dens = density * b.density
    c.capsule((x - w * 0.42, y - h / 2), (x + w * 0.42, y - h / 2), 2.0, dens * 0.6, "bone")  # end plates
    c.capsule((x - w * 0.42, y + h / 2), (x + w * 0.42, y + h / 2), 2.0, dens * 0.6, "bone")
    for side in (-1, 1):
        c.ellipse((x + side * w * 0.33, y - h * 0.2), (w * 0.1, h * 0.17), 0, dens * 0.7, "bone", thickness=2.2)
        c.capsule((x + side * w * 0.45, y - h * 0.05), (x + side * w * 0.95, y - h * 0.1), h * 0.22, dens * 0.5)
    c.ellipse((x, y + h * 0.3), (w * 0.08, h * 0.28), 0, dens * 0.6, "bone")


def _lspine(c: Canvas, b: Body, rng: np.random.Generator) -> None:
    s = b.scale
    c.polygon(_scaled([(-175, -260), (175, -260), (180, 260), (-180, 260)], s), 0.6, "soft")
    for side in (-1, 1):  # psoas shadows fan out from the spine
        c.polygon(_scaled([(side * 25, -120), (side * 45, -120), (side * 95, 150), (side * 60, 160)], s), 0.05, "soft")
    _bowel_gas(c, rng, s, count=int(rng.integers(3, 10)), area=(170, 220))
    disc = (6.0 if b.age > 60 else 9.0 + 2 * (b.age < 16)) * s
    height = 27 * s
    curve = rng.uniform(-1, 1) * (10 if b.age > 55 or 10 < b.age < 18 else 4)
    y = -175 * s
    for level in range(6):  # T12 .. L5
        w = (42 + 3 * level) * s
        x = curve * math.sin(math.pi * level / 5) * s
        _vertebra(c, b, (x, y), w, height)
        if b.age > 55:  # osteophytes at the body corners
            for side in (-1, 1):
                c.polygon(
                    [
                        (x + side * w / 2, y + height / 2),
                        (x + side * (w / 2 + 5 * s), y + height / 2 + 2),
                        (x + side * w / 2, y + height / 2 - 5 * s),
                    ],
                    0.3 * b.density,
                )
        if level == 0:
            for side in (-1, 1):
                c.polyline([(x + side * w * 0.9, y), (side * 110 * s, y + 60 * s)], 8 * s, 0.15 * b.density)
        y += height + disc
    _sacrum_and_wings(c, b, rng, top=y + 5 * s, s=s)


def _sacrum_and_wings(c: Canvas, b: Body, rng: np.random.Generator, top: float, s: float) -> None:
    dens = b.density
    c.polygon([(-50 * s, top), (50 * s, top), (0, top + 120 * s)], 0.25 * dens)
    for k in range(4):
        for side in (-1, 1):
            c.ellipse((side * 20 * s, top + (18 + 22 * k) * s), (5 * s, 4 * s), 0, -0.1 * dens)
    flare = 1.1 if b.female else 1.0
    for side in (-1, 1):
        wing = [(45, 10), (80, -40), (140 * flare, -45), (165 * flare, -5), (150 * flare, 60), (95, 110), (55, 90)]
        pts = [(side * x * s, top + y * s) for x, y in _jitter(rng, wing, 3)]
        c.polygon(pts, 0.22 * dens)
        c.polyline([*pts, pts[0]], 4 * s, 0.15 * dens)


def _bowel_gas(c: Canvas, rng: np.random.Generator, s: float, count: int, area: Point) -> None:
    for _ in range(count):
        x, y = rng.uniform(-area[0], area[0]) * s, rng.uniform(-area[1], area[1]) * s
        pts = [(x, y)]
        for _ in range(int(rng.integers(1, 5))):
            x += rng.uniform(-40, 40) * s
            y += rng.uniform(-40, 40) * s
            pts.append((x, y))
        c.polyline(pts, rng.uniform(10, 28) * s, -rng.uniform(0.06, 0.2), "organ")


def _abdomen(c: Canvas, b: Body, rng: np.random.Generator) -> None:
    s = b.scale
    c.polygon(_scaled([(-165, -280), (165, -280), (185, 0), (195, 280), (-195, 280), (-185, 0)], s), 0.6, "soft")
    c.polygon(_scaled([(-175, -280), (10, -280), (-20, -140), (-170, -60)], s), 0.06, "organ")  # liver
    for side, dy in ((-1, 15), (1, 0)):  # kidneys
        c.ellipse((side * 65 * s, (-95 + dy) * s), (28 * s, 55 * s), side * -15, 0.03, "organ")
    _bowel_gas(c, rng, s, count=int(rng.integers(8, 22)) + (8 if b.age < 10 else 0), area=(150, 200))
    height, disc = 24 * s, 8 * s
    y = -170 * s
    for level in range(5):
        _vertebra(c, b, (0, y), (38 + 3 * level) * s, height, 0.25)
        y += height + disc
    for side in (-1, 1):  # lowest ribs
        for i in range(2):
            c.polyline(
                [(side * 40 * s, (-270 + 30 * i) * s), (side * 150 * s, (-200 + 40 * i) * s)], 8 * s, 0.1 * b.density
            )
    _sacrum_and_wings(c, b, rng, top=y + 5 * s, s=s)


def _pelvis(c: Canvas, b: Body, rng: np.random.Generator) -> None:
    s = b.scale
    c.polygon(_scaled([(-215, -220), (215, -220), (230, 220), (-230, 220)], s), 0.6, "soft")
    _bowel_gas(c, rng, s, count=int(rng.integers(2, 8)), area=(150, 90))
    dens = b.density
    wide = 1.12 if b.female and b.age >= 12 else 1.0
    _vertebra(c, b, (0, -150 * s), 52 * s, 30 * s)
    c.polygon(_scaled([(-55, -125), (55, -125), (0, 20)], s), 0.25 * dens)  # sacrum
    plate = b.plate(16.5)
    for side in (-1, 1):
        wing: list[Point] = [
            (50, -120),
            (85, -165),
            (150, -175),
            (185, -130),
            (170, -60),
            (120, -10),
            (75, 10),
            (45, -60),
        ]
        wing = [(x * wide, y) for x, y in wing]
        pts = _scaled(_jitter(rng, [(side * x, y) for x, y in wing], 3), s)
        c.polygon(pts, 0.2 * dens)
        c.polyline([*pts, pts[0]], 4 * s, 0.15 * dens)
        # Pelvic brim (inlet outline): rounder and wider in women.
        c.ellipse(
            (0, -45 * s),
            (100 * s * wide, (75 if b.female else 65) * s),
            0,
            0.2 * dens,
            "bone",
            thickness=5 * s,
            arc=(0, 180) if side > 0 else (180, 360),
        )
        # Pubic and ischial rami around the obturator foramen; wider subpubic angle in women.
        ox = side * (52 + (12 if b.female else 0)) * s
        c.ellipse((ox, 70 * s), (28 * s * wide, 36 * s), side * -20, 0.3 * dens, "bone", thickness=11 * s)
        head = (side * 108 * s * wide, 10 * s)
        c.ellipse((head[0], head[1] - 5 * s), (36 * s, 36 * s), 0, 0.2 * dens, "bone", thickness=6 * s, arc=(180, 360))
        if plate > 0.3:  # triradiate cartilage of the acetabulum
            c.capsule((head[0] - side * 25 * s, head[1] - 20 * s), (head[0], head[1]), 3 * s, -0.2 * dens)
        # Proximal femur: head (a late ossification centre in infants), neck, trochanter and shaft.
        size = b.ossified(0.4)
        if size > 0:
            c.blob(head, (27 * s * size, 27 * s * size), 0, b, 0.45)
        neck_end = (side * 150 * s * wide, 55 * s)
        start = _along(head, side * 135, (30 + 6 * plate) * s)
        c.bone(start, neck_end, 30 * s, b, 0.4, None)
        c.blob((side * 170 * s * wide, 50 * s), (20 * s, 25 * s), 0, b, 0.4)
        c.bone(neck_end, (side * 155 * s * wide, 260 * s), 34 * s, b, 0.45, None)
    if plate > 0:
        c.capsule((0, 50 * s), (0, 95 * s), 6 * s * plate, -0.15 * dens)  # open symphysis in children


def _skull(c: Canvas, b: Body, rng: np.random.Generator) -> None:
    # The cranium grows little after infancy; the face grows a lot.
    head = float(np.interp(b.age, [0, 1, 3, 10, 18], [0.68, 0.8, 0.87, 0.95, 1.0])) * rng.uniform(0.95, 1.05)
    face = float(np.interp(b.age, [0, 2, 6, 12, 18], [0.45, 0.55, 0.7, 0.85, 1.0]))
    dens = b.density
    c.ellipse((0, -10 * head), (80 * head, 100 * head), 0, 0.6, "soft")
    c.ellipse((0, 70 * face), (60 * face, 65 * face), 0, 0.45, "soft")
    c.ellipse((0, -25 * head), (76 * head, 92 * head), 0, 0.42 * dens, "bone")
    c.ellipse((0, -25 * head), (68 * head, 84 * head), 0, -0.32 * dens, "bone")
    if b.age < 1.5:  # anterior fontanelle and open sutures
        c.ellipse((0, -105 * head), (14 * head, 10 * head), 0, -0.2 * dens, "bone")
        c.polyline([(0, -110 * head), (0, -20 * head)], 3, -0.12 * dens)
        c.ellipse((0, -25 * head), (72 * head, 88 * head), 0, -0.1 * dens, "bone", thickness=2.5, arc=(200, 340))
    elif b.age < 20:
        c.polyline([(0, -115 * head), (0, -40 * head)], 1.5, -0.06 * dens)
    top = 20 * head - 10 * face
    # Petrous ridges across the orbits, orbits, nasal cavity, sinuses.
    for side in (-1, 1):
        c.polyline([(side * 70 * head, top + 30 * face), (side * 15 * face, top + 5 * face)], 7 * face, 0.25 * dens)
        c.ellipse((side * 30 * face, top), (17 * face, 18 * face), 0, 0.2 * dens, "bone", thickness=3.5 * face)
        c.ellipse((side * 30 * face, top), (15 * face, 16 * face), 0, -0.1, "organ")
        if b.age > 6:
            sinus = min((b.age - 6) / 10, 1.0)
            c.ellipse((side * 28 * face, top + 40 * face), (16 * face * sinus, 18 * face * sinus), 0, -0.15, "organ")
    c.polygon([(0, top + 8 * face), (-12 * face, top + 50 * face), (12 * face, top + 50 * face)], -0.12, "organ")
    # Mandible and teeth.
    jaw = [(-55, 25), (-52, 70), (-35, 98), (0, 108), (35, 98), (52, 70), (55, 25)]
    c.polyline([(x * face, top + y * face) for x, y in jaw], 10 * face, 0.3 * dens, "bone")
    edentulous = b.age > 70 and rng.random() < 0.5
    if b.age >= 0.5 and not edentulous:
        for row, y in ((0, 62), (1, 78)):
            for k in range(-7, 8):
                x = k * 5.6 * face
                c.capsule(
                    (x, top + (y - 6 + 2 * row) * face),
                    (x, top + (y + 6 - 2 * row) * face),
                    4.5 * face,
                    0.45 * dens,
                    "bone",
                )
    if 0.5 < b.age < 12:  # permanent tooth buds waiting in the jaws
        for k in range(-5, 6, 2):
            c.ellipse((k * 6.5 * face, top + 92 * face), (4 * face, 4 * face), 0, 0.3 * dens)
    neck_top = top + 100 * face
    c.polygon([(-45, neck_top), (45, neck_top), (55, neck_top + 160), (-55, neck_top + 160)], 0.45, "soft")
    for k in range(5):  # cervical vertebrae below the skull base
        c.blob((0, neck_top + (12 + 24 * k) * face), (16 * face, 9 * face), 0, b, 0.22)


def _shoulder(c: Canvas, b: Body, rng: np.random.Generator) -> None:
    s = b.scale
    dens = b.density
    c.polygon(_scaled([(-200, -150), (110, -110), (115, 160), (-200, 160)], s), 0.55, "soft")
    c.polygon(_scaled([(-200, -30), (-75, -50), (-60, 40), (-70, 160), (-200, 160)], s), -0.25, "organ")  # lung
    for i in range(6):
        y = (-80 + 45 * i) * s
        c.polyline([(-200 * s, y - 40 * s), (-110 * s, y), (-60 * s, y + 40 * s)], 8 * s, 0.12 * dens)
    c.polygon(_scaled([(5, -40), (-70, -30), (-35, 130)], s), 0.1 * dens)  # scapula body
    c.polyline(_scaled([(5, -40), (-35, 130)], s), 5 * s, 0.2 * dens)
    c.blob((8 * s, -5 * s), (8 * s, 24 * s), 0, b, 0.35)  # glenoid
    c.bone((-200 * s, -95 * s), (25 * s, -70 * s), 19 * s, b, 0.35, None)  # clavicle
    c.bone((-10 * s, -60 * s), (55 * s, -58 * s), 17 * s, b, 0.3, None)  # acromion
    c.blob((-15 * s, -30 * s), (9 * s, 9 * s), 0, b, 0.3)  # coracoid
    plate = b.plate(18.5)
    head = (42 * s, -5 * s)
    if b.ossified(0.3) > 0:
        size = b.ossified(0.3)
        c.blob(head, (30 * s * size, 29 * s * size), 0, b, 0.45)
    shaft_top = (50 * s, (15 + 10 * plate) * s)
    c.bone(shaft_top, (70 * s, 220 * s), 30 * s, b, 0.45, None)
    c.blob((68 * s, 10 * s), (12 * s, 16 * s), 0, b, 0.35)  # greater tuberosity


def _hand(c: Canvas, b: Body, rng: np.random.Generator) -> None:
    s = b.scale
    spread = rng.uniform(0.7, 1.3)
    bases = [(-30, 62), (-16, 52), (-3, 49), (9, 52), (20, 58)]
    angles = [-38 * spread, -11 * spread, 0, 8 * spread, 18 * spread]
    lengths: list[list[float]] = [
        [46, 32, 0, 24],
        [68, 40, 23, 18],
        [65, 45, 27, 19],
        [58, 42, 25, 19],
        [53, 33, 18, 17],
    ]
    widths: list[list[float]] = [[12, 10, 0, 9], [10, 9.5, 8, 7], [10, 10, 8.5, 7], [9, 9, 8, 7], [8.5, 8, 7, 6.5]]
    shift_y = -25.0
    # Soft tissue follows the bones; the palm is one polygon.
    palm = [(-38, 70), (-30, 40), (-20, -20), (28, -15), (30, 50), (24, 95), (-22, 100)]
    c.polygon([(x * s, (y + shift_y) * s) for x, y in palm], 0.0, "soft", "_skin")
    c.capsule((0, (90 + shift_y) * s), (2 * s, (200 + shift_y) * s), 60 * s, 0.0, "soft", "_skin")
    gap = (2.8 if b.age < 65 else 1.8) * s
    for ray in range(5):
        base = (bases[ray][0] * s, (bases[ray][1] + shift_y) * s)
        lens = [v * s for v in lengths[ray]]
        tip = _along(base, angles[ray], sum(lens) + 8 * s)
        c.capsule(_along(base, angles[ray], 25 * s), tip, (widths[ray][1] + 9) * s, 0.0, "soft", "_skin")
        # Metacarpal 1 has its epiphysis at the base, metacarpals 2-5 at the head; phalanges at the base.
        epi = ["base" if ray == 0 else "head", "base", "base", "base"]
        _ray(c, b, base, angles[ray], lens, [w * s for w in widths[ray]], epi, onset=1.2, fuse_age=16.5, gap=gap)
    c.fill("_skin", 0.5)
    # Carpal bones appear one by one through childhood: a classic bone-age sign.
    carpals = [
        ((-2, 76), (8, 10), 0, 0.2),  # capitate
        ((11, 77), (7, 9), 10, 0.3),  # hamate
        ((18, 90), (6, 6), 0, 2.5),  # triquetrum
        ((4, 92), (7, 6), 0, 4.0),  # lunate
        ((-23, 76), (7, 7), 0, 5.0),  # trapezium
        ((-13, 73), (5, 6), 0, 5.5),  # trapezoid
        ((-13, 89), (6, 10), -50, 6.0),  # scaphoid
        ((20, 82), (4, 4), 0, 10.0),  # pisiform
    ]
    for (x, y), (ax, ay), ang, onset in carpals:
        size = b.ossified(onset)
        if size > 0:
            c.blob((x * s, (y + shift_y) * s), (ax * s * size, ay * s * size), ang, b, 0.42, "bones")
    # Distal radius and ulna with their epiphyses.
    for x, width, onset in ((-10, 24, 1.0), (17, 14, 6.0)):
        top = (x * s, (104 + shift_y) * s)
        plate = b.plate(17.5)
        size = b.ossified(onset)
        if plate > 0:
            shaft_top = (x * s, (104 + 10 * s + 2 * plate + shift_y) * s)
            c.bone(shaft_top, (x * s, (250 + shift_y) * s), width * s, b, 0.45)
            if size > 0:
                c.blob((top[0], top[1] + 3 * s), (width * 0.5 * s * size, 4.5 * s * size), 0, b, 0.42, "bones")
        else:
            c.bone(top, (x * s, (250 + shift_y) * s), width * s, b, 0.45)


def _knee(c: Canvas, b: Body, rng: np.random.Generator) -> None:
    s = b.scale
    dens = b.density
    c.polygon(_scaled([(-75, -200), (75, -200), (62, 0), (55, 200), (-55, 200), (-62, 0)], s), 0.6, "soft")
    plate_f, plate_t = b.plate(17.5), b.plate(17.0)
    gap = ((7 if b.age > 16 else 9) - (3 if b.age > 65 else 0)) * s
    phys_f = (1.5 + 5 * plate_f) * s if plate_f > 0 else 0.0
    phys_t = (1.5 + 5 * plate_t) * s if plate_t > 0 else 0.0
    # Distal femur: shaft flaring into the metaphysis; the condyles below (a separate epiphysis in children).
    c.bone((0, -200 * s), (0, -70 * s), 30 * s, b, 0.45, None)
    c.polygon(_scaled([(-15, -100), (15, -100), (42, -40), (40, -25), (-40, -25), (-42, -40)], s), 0.0, mask="_fm")
    c.solid("_fm", b, 0.4)
    condyle_top = -25 * s + phys_f
    epi = b.ossified(0.0) if b.age > 0.05 else 0.5
    bottom = -gap / 2
    height = (bottom - condyle_top) * epi
    for side in (-1, 1):
        c.ellipse((side * 20 * s * epi, bottom - height / 2), (21 * s * epi, height / 2), 0, 0.0, mask="_fe")
    c.polygon(
        [
            (-38 * s * epi, condyle_top),
            (38 * s * epi, condyle_top),
            (38 * s * epi, bottom - height * 0.4),
            (-38 * s * epi, bottom - height * 0.4),
        ],
        0.0,
        mask="_fe",
    )
    c.solid("_fe", b, 0.4)
    c.ellipse((0, bottom - 4 * s), (6 * s, 9 * s), 0, -0.12 * dens)  # intercondylar notch
    if b.ossified(4.0) > 0:  # patella, faint through the femur
        size = b.ossified(4.0)
        c.ellipse((3 * s, -40 * s), (21 * s * size, 25 * s * size), 0, 0.12 * dens, "bone", "bones")
    # Proximal tibia: the plateau (epiphysis in children) above the metaphysis, then the shaft; fibula.
    top_t = gap / 2 + (9 * s if b.age < 1 else 0.0)
    c.polygon([(-40 * s, top_t), (40 * s, top_t), (38 * s, top_t + 16 * s), (-38 * s, top_t + 16 * s)], 0.0, mask="_te")
    c.solid("_te", b, 0.4)
    meta = top_t + 16 * s + phys_t
    c.polygon([(-38 * s, meta), (38 * s, meta), (18 * s, meta + 55 * s), (-18 * s, meta + 55 * s)], 0.0, mask="_tm")
    c.solid("_tm", b, 0.4)
    c.bone((0, meta + 40 * s), (0, 220 * s), 32 * s, b, 0.45)
    if b.ossified(3.0) > 0:
        c.blob((40 * s, meta + 12 * s), (10 * s, 11 * s), 0, b, 0.35, "bones")  # fibular head
    c.bone((38 * s, meta + 26 * s), (34 * s, 220 * s), 12 * s, b, 0.4)
    if b.age > 60 and rng.random() < 0.7:  # marginal osteophytes
        for side in (-1, 1):
            c.polygon(
                [(side * 40 * s, top_t), (side * 48 * s, top_t - 4 * s), (side * 40 * s, top_t + 8 * s)], 0.3 * dens
            )


def _foot(c: Canvas, b: Body, rng: np.random.Generator) -> None:
    s = b.scale
    shift_y = -20.0
    c.polygon(
        _scaled([(-45, 170), (-50, 40), (-48, -60), (-20, -85), (45, -65), (48, 40), (35, 170)], s),
        0.0,
        "soft",
        "_skin",
    )
    c.fill("_skin", 0.55)
    tarsals = [
        ((5, 125), (24, 28), 0, 0.0),  # calcaneus (seen through the talus)
        ((-5, 100), (20, 22), 0, 0.0),  # talus
        ((25, 70), (13, 16), 10, 0.1),  # cuboid
        ((16, 42), (7, 11), 0, 1.0),  # lateral cuneiform
        ((-26, 40), (9, 13), 0, 2.0),  # medial cuneiform
        ((-8, 42), (6, 10), 0, 3.0),  # intermediate cuneiform
        ((-12, 66), (20, 8), -10, 3.0),  # navicular
    ]
    for (x, y), (ax, ay), ang, onset in tarsals:
        size = b.ossified(onset)
        if size > 0:
            c.blob((x * s, (y + shift_y) * s), (ax * s * size, ay * s * size), ang, b, 0.38)
    bases = [(-26, 25), (-9, 28), (4, 30), (16, 32), (27, 40)]
    angles = [-6, -3, 2, 8, 15]
    lengths: list[list[float]] = [[62, 28, 0, 22], [72, 20, 9, 7], [66, 18, 8, 7], [63, 16, 8, 6], [60, 14, 7, 6]]
    widths: list[list[float]] = [[20, 15, 0, 13], [11, 8, 7, 7], [11, 8, 7, 6.5], [10, 8, 7, 6.5], [11, 8, 7, 6.5]]
    for ray in range(5):
        base = (bases[ray][0] * s, (bases[ray][1] + shift_y) * s)
        lens = [v * s for v in lengths[ray]]
        tip = _along(base, angles[ray], sum(lens) + 6 * s)
        c.capsule(_along(base, angles[ray], 40 * s), tip, (widths[ray][1] + 10) * s, 0.0, "soft", "_skin")
        epi = ["base" if ray == 0 else "head", "base", "base", "base"]
        _ray(
            c,
            b,
            base,
            angles[ray],
            lens,
            [w * s for w in widths[ray]],
            epi,
            onset=2.0,
            fuse_age=16.0,
            gap=2.6 * s,
            density=0.4,
        )
    if b.age > 10:  # sesamoids under the first metatarsal head
        head = _along((bases[0][0] * s, (bases[0][1] + shift_y) * s), angles[0], 58 * s)
        for dx in (-5, 5):
            c.blob((head[0] + dx * s, head[1]), (4 * s, 5 * s), 0, b, 0.35)


# --- lateral views (the patient faces image left) --------------------------------------------------------


def _chest_lat(c: Canvas, b: Body, rng: np.random.Generator) -> None:
    s = b.scale
    child = float(np.clip((12 - b.age) / 12, 0, 1))
    deep = rng.uniform(0.9, 1.1) * (1.0 + 0.1 * (b.age > 65))  # barrel chest in the elderly
    torso = [(-120, -300), (-135, -150), (-140, 0), (-150, 300), (165, 300), (160, 0), (150, -150), (110, -300)]
    c.polygon(_scaled(_jitter(rng, torso, 5), s, deep), 0.75, "soft")
    for side_x in (-30, 40):  # raised arms over the upper chest
        c.capsule((side_x * s, -320 * s), (side_x * s * 1.2, -120 * s), 70 * s, 0.2, "soft")
    if b.female and b.age >= 14:
        c.dome((-150 * s * deep, 60 * s), (45 * s, 70 * s), 0, 0.12, "organ")
    # Both lungs superimposed: apex high, deep posterior sulcus, diaphragm sloping down to the back.
    lung = [(-20, -190), (-75, -150), (-105, -60), (-110, 40), (-95, 70), (-50, 60), (0, 70), (60, 95), (105, 135)]
    lung += [(118, 60), (120, -40), (100, -140), (50, -185)]
    c.polygon(_scaled(_jitter(rng, lung, 4), s, deep), -0.2 - 0.04 * child, "organ", "lungs")
    heart_centre = (-40 * s * deep, 30 * s)
    heart_axes = ((62 + 10 * child) * s, 62 * s)
    c.ellipse(heart_centre, heart_axes, 20, 0.0, "organ", "heart")
    overlap = c.masks["lungs"] & c.masks["heart"]
    c.layers["organ"][overlap] += 0.2 + 0.04 * child
    c.masks["lungs"] &= ~c.masks["heart"]
    c.dome(heart_centre, heart_axes, 20, 0.05, "organ")
    for _ in range(int(rng.integers(10, 16))):
        start = (rng.uniform(-20, 30) * s, rng.uniform(-40, 10) * s)
        _vessel_tree(c, start, float(rng.uniform(-180, 180)), 90 * s, 3.5 * s, rng, depth=2)
    c.layers["vessel"] *= c.masks["lungs"].astype(np.float32)
    c.capsule((-5 * s, -300 * s), (20 * s, -60 * s), 16 * s, -0.12, "organ")  # trachea
    # Thoracic spine at the back, following the kyphosis; sternum at the front.
    kyphosis = 25 + (20 if b.age > 65 else 0)
    for k in range(13):
        t = k / 12
        x = (70 + kyphosis * math.sin(math.pi * t) - 10) * s * deep
        y = (-280 + 42 * k) * s
        c.blob((x, y), (17 * s, 14 * s), -10 + 20 * t, b, 0.3)
        c.capsule((x + 22 * s, y), (x + 45 * s, y + 12 * s), 9 * s, 0.12 * b.density, "bone")  # posterior elements
    c.capsule((-132 * s * deep, -170 * s), (-128 * s * deep, 60 * s), 12 * s, 0.18 * b.density, "bone")
    for k in range(9):  # ribs seen end-on and obliquely behind the lungs
        y = (-160 + 30 * k) * s
        c.polyline([(110 * s * deep, y), (40 * s, y + 30 * s), (-90 * s * deep, y + 70 * s)], 6 * s, 0.04 * b.density)
    c.polyline(_scaled([(70, -220), (105, -40)], s, deep), 5 * s, 0.1 * b.density)  # scapular border


def _knee_lat(c: Canvas, b: Body, rng: np.random.Generator) -> None:
    s = b.scale
    dens = b.density
    flex = rng.uniform(5, 25)  # knee slightly bent
    c.polygon(_scaled([(-70, -200), (75, -200), (70, 0), (65, 200), (-55, 200), (-70, 0)], s), 0.6, "soft")
    plate_f, plate_t = b.plate(17.5), b.plate(17.0)
    gap = ((7 if b.age > 16 else 9) - (3 if b.age > 65 else 0)) * s
    # Femur comes down from above; its condyles form one rounded end.
    c.bone((8 * s, -200 * s), (4 * s, -60 * s), 30 * s, b, 0.45, None)
    c.polygon(_scaled([(-12, -90), (22, -90), (40, -35), (-30, -35)], s), 0.0, mask="_fm")
    c.solid("_fm", b, 0.4)
    epi = b.ossified(0.0) if b.age > 0.05 else 0.5
    phys = (1.5 + 5 * plate_f) * s if plate_f > 0 else 0.0
    radius = 32 * s * epi
    c.ellipse((8 * s, -gap / 2 - radius), (radius * 1.05, radius), 0, 0.0, mask="_fe")
    c.polygon(
        [
            (-25 * s, -35 * s + phys),
            (38 * s, -35 * s + phys),
            (38 * s, -gap / 2 - radius),
            (-25 * s, -gap / 2 - radius),
        ],
        0.0,
        mask="_fe",
    )
    c.solid("_fe", b, 0.4)
    if b.ossified(4.0) > 0:  # patella in front of the condyles
        size = b.ossified(4.0)
        c.blob((-45 * s, -40 * s), (12 * s * size, 24 * s * size), 15, b, 0.4, "bones")
    # Tibia, tilted by the flexion, with its tuberosity in front; the fibular head behind.
    top = gap / 2
    tibia_axis = 180.0 - flex
    c.polygon([(-30 * s, top), (40 * s, top), (34 * s, top + 16 * s), (-26 * s, top + 16 * s)], 0.0, mask="_te")
    c.solid("_te", b, 0.4)
    meta = top + 16 * s + ((1.5 + 5 * plate_t) * s if plate_t > 0 else 0.0)
    c.polygon([(-26 * s, meta), (36 * s, meta), (20 * s, meta + 50 * s), (-18 * s, meta + 50 * s)], 0.0, mask="_tm")
    c.solid("_tm", b, 0.4)
    c.blob((-28 * s, meta + 28 * s), (8 * s, 14 * s), 0, b, 0.3, "bones")  # tuberosity
    shaft_top = (2 * s, meta + 35 * s)
    c.bone(shaft_top, _along(shaft_top, tibia_axis, 200 * s), 30 * s, b, 0.45)
    fib_top = (32 * s, meta + 20 * s)
    if b.ossified(3.0) > 0:
        c.blob(fib_top, (10 * s, 11 * s), 0, b, 0.3, "bones")
    c.bone((fib_top[0], fib_top[1] + 10 * s), _along(fib_top, tibia_axis, 200 * s), 12 * s, b, 0.35)
    if b.age > 60 and rng.random() < 0.6:
        c.polygon([(-45 * s, -30 * s), (-55 * s, -25 * s), (-45 * s, -18 * s)], 0.3 * dens)  # patellar spur


def _lspine_lat(c: Canvas, b: Body, rng: np.random.Generator) -> None:
    s = b.scale
    dens = b.density
    c.polygon(_scaled([(-170, -260), (150, -260), (170, 260), (-190, 260)], s), 0.75, "soft")
    _bowel_gas(c, rng, s, count=int(rng.integers(3, 9)), area=(120, 200))
    lordosis = rng.uniform(15, 35) * (0.6 if b.age > 70 else 1.0)
    disc = (6.0 if b.age > 60 else 9.0 + 2 * (b.age < 16)) * s
    height = 27 * s
    y = -185 * s
    for level in range(6):  # T12 .. L5, bodies deeper than tall
        t = level / 5
        x = (20 - lordosis * math.sin(math.pi * t)) * s
        depth = (36 + 2 * level) * s
        tilt = (-8 + 22 * t) if level > 3 else (-8 + 12 * t)
        c.ellipse((x, y), (depth / 2, height / 2), tilt, 0.0, mask="_vb")
        c.polygon(
            [
                (x - depth / 2, y - height / 2 + 3 * s),
                (x + depth / 2, y - height / 2 + 3 * s),
                (x + depth / 2, y + height / 2 - 3 * s),
                (x - depth / 2, y + height / 2 - 3 * s),
            ],
            0.0,
            mask="_vb",
        )
        c.solid("_vb", b, 0.4)
        # Pedicle, facets and spinous process behind the body.
        c.capsule((x + depth / 2, y - height * 0.25), (x + depth / 2 + 18 * s, y - height * 0.2), 10 * s, 0.2 * dens)
        c.polygon(
            [
                (x + depth / 2 + 18 * s, y - height * 0.5),
                (x + depth / 2 + 55 * s, y - height * 0.2),
                (x + depth / 2 + 55 * s, y + height * 0.3),
                (x + depth / 2 + 18 * s, y + height * 0.4),
            ],
            0.22 * dens,
        )
        if b.age > 55:
            for sign in (-1, 1):
                c.polygon(
                    [
                        (x - depth / 2, y + sign * height / 2),
                        (x - depth / 2 - 6 * s, y + sign * (height / 2 + 3 * s)),
                        (x - depth / 2 + 4 * s, y + sign * height / 2),
                    ],
                    0.3 * dens,
                )
        y += height + disc
    # Sacrum angled backwards below L5.
    x = (20 - lordosis * math.sin(math.pi)) * s
    sacrum = [(x - 20 * s, y), (x + 30 * s, y - 5 * s), (x + 70 * s, y + 110 * s), (x + 40 * s, y + 120 * s)]
    c.polygon(sacrum, 0.0, mask="_sacrum")
    c.solid("_sacrum", b, 0.25, None)
    c.ellipse((10 * s, 190 * s), (90 * s, 70 * s), -10, 0.06 * dens, "organ")  # iliac wings superimposed


def _skull_lat(c: Canvas, b: Body, rng: np.random.Generator) -> None:
    head = float(np.interp(b.age, [0, 1, 3, 10, 18], [0.68, 0.8, 0.87, 0.95, 1.0])) * rng.uniform(0.95, 1.05)
    face = float(np.interp(b.age, [0, 2, 6, 12, 18], [0.45, 0.55, 0.7, 0.85, 1.0]))
    dens = b.density
    c.ellipse((10 * head, 0), (98 * head, 82 * head), 0, 0.6, "soft")
    c.ellipse((10 * head, -5 * head), (94 * head, 78 * head), 0, 0.4 * dens, "bone")
    c.ellipse((10 * head, -5 * head), (86 * head, 70 * head), 0, -0.3 * dens, "bone")
    if b.age < 1.5:
        c.ellipse((-30 * head, -78 * head), (14 * head, 6 * head), 0, -0.2 * dens, "bone")  # fontanelle
    base_y = 45 * head
    c.polyline([(-60 * head, base_y - 20 * head), (0, base_y), (60 * head, base_y + 10 * head)], 8, 0.3 * dens)
    c.ellipse(
        (5 * head, base_y - 12 * head), (9 * head, 7 * head), 0, 0.25 * dens, "bone", thickness=2.5, arc=(0, 180)
    )  # sella turcica
    c.blob((45 * head, base_y + 8 * head), (14 * head, 10 * head), 0, b, 0.45)  # petrous bone
    fx = -75 * head
    # Face in front: orbit, maxilla, sinuses, jaw and teeth.
    c.ellipse((fx + 15 * face, base_y - 15 * face), (16 * face, 18 * face), 0, 0.2 * dens, "bone", thickness=3 * face)
    if b.age > 6:
        sinus = min((b.age - 6) / 10, 1.0)
        c.ellipse((fx + 10 * face, base_y + 25 * face), (20 * face * sinus, 15 * face * sinus), 0, -0.12, "organ")
    c.ellipse((fx + 5 * face, base_y + 40 * face), (45 * face, 55 * face), 0, 0.45, "soft")
    jaw = [(30, 35), (25, 80), (0, 95), (-40, 100), (-70, 92)]
    c.polyline([(fx + 60 * face + x * face, base_y + y * face) for x, y in jaw], 10 * face, 0.3 * dens, "bone")
    if b.age >= 0.5 and not (b.age > 70 and rng.random() < 0.5):
        for row, y in ((0, 55), (1, 68)):
            for k in range(7):
                x = fx - 5 * face + k * 7 * face
                c.capsule(
                    (x, base_y + (y - 6 + 2 * row) * face),
                    (x, base_y + (y + 6 - 2 * row) * face),
                    6 * face,
                    0.4 * dens,
                    "bone",
                )
    for k in range(5):  # cervical spine behind the jaw
        c.blob((40 * head, base_y + (60 + 24 * k) * face), (13 * face, 9 * face), 0, b, 0.25)
    c.polygon(
        [
            (0, base_y + 40 * face),
            (80 * head, base_y + 40 * face),
            (90 * head, base_y + 200 * face),
            (-20, base_y + 200 * face),
        ],
        0.45,
        "soft",
    )


_LATERALS: dict[str, Callable[[Canvas, Body, np.random.Generator], None]] = {
    "chest": _chest_lat,
    "knee": _knee_lat,
    "lspine": _lspine_lat,
    "skull": _skull_lat,
}

# The phantom table: one frontal drawing per body part of `labels.BODY_PARTS` the generator can draw.
_PARTS: dict[str, Callable[[Canvas, Body, np.random.Generator], None]] = {
    "chest": _chest,
    "abdomen": _abdomen,
    "pelvis": _pelvis,
    "skull": _skull,
    "lspine": _lspine,
    "shoulder": _shoulder,
    "hand": _hand,
    "knee": _knee,
    "foot": _foot,
}


def check_body_parts(table: str, parts: Iterable[str], *, complete: bool = False) -> None:
    """Refuse a synth table whose keys are not body parts the phantoms draw, named as `labels.BODY_PARTS` does.

    Args:
        table: The table's name, for the message.
        parts: Its body-part keys.
        complete: Also require every drawable body part (a table every drawn image looks up).

    Raises:
        ValueError: a key outside the vocabulary or without a phantom, or (complete) a drawable part missing.
    """
    parts = list(parts)
    foreign = [p for p in parts if p not in labels.BODY_PARTS or p == labels.UNKNOWN]
    if foreign:
        raise ValueError(
            f"synth {table}: {', '.join(foreign)} not in the body-part vocabulary of radpretrain.shards.labels "
            f"(known: {', '.join(p for p in labels.BODY_PARTS if p != labels.UNKNOWN)})"
        )
    undrawn = [p for p in parts if p not in _PARTS]
    missing = [p for p in _PARTS if p not in parts] if complete else []
    if undrawn or missing:
        raise ValueError(
            f"synth {table}: no phantom for {', '.join(undrawn) or 'none'}, no entry for {', '.join(missing) or 'none'}"
        )


#: Body parts the generator can draw: the `labels.BODY_PARTS` entries with a phantom, in that vocabulary's order.
BODY_PARTS: tuple[str, ...] = tuple(part for part in labels.BODY_PARTS if part in _PARTS)

check_body_parts("phantoms", _PARTS)
check_body_parts("lateral phantoms", _LATERALS)
check_body_parts("FIELD_MM", FIELD_MM, complete=True)
check_body_parts("MASK_STRUCTURES", MASK_STRUCTURES)
check_body_parts("SIDED", SIDED)

#: Projections each body part can be drawn in ("LAT" only where a lateral phantom exists).
VIEWS: dict[str, tuple[str, ...]] = {
    part: ("PA", "AP", "LAT") if part in _LATERALS else ("PA", "AP") for part in BODY_PARTS
}


def default_shape(body_part: str, long_side: int) -> tuple[int, int]:
    """(rows, cols) with the body part's usual detector aspect and `long_side` pixels on the long side."""
    height, width = FIELD_MM[body_part]
    if height >= width:
        return long_side, max(round(long_side * width / height), 1)
    return max(round(long_side * height / width), 1), long_side


def field_of_view(body_part: str, body: Body) -> float:
    """Long side of the detector field in mm: children get smaller cassettes, yet fill less of the frame."""
    return max(FIELD_MM[body_part]) * (0.55 + 0.45 * body.scale)


def render_attenuation(
    body_part: str,
    age: float,
    sex: str | None,
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    laterality: str | None = None,
    field_mm: float | None = None,
    view: str | None = None,
    finding: str | None = None,
    finding_rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """Draw one phantom at working resolution (with a lung finding of `finding`'s kind, drawn from `finding_rng`).

    Returns:
        attenuation (float32, about 0..1.5, higher = more attenuation), boolean masks at working resolution,
        and the output pixel spacing in mm for `shape`.
    """
    if body_part not in _PARTS:
        raise ValueError(f"unknown body part '{body_part}'; known: {', '.join(BODY_PARTS)}")
    body = Body(age=float(age), sex=sex)
    rows, cols = shape
    fov_long = field_of_view(body_part, body) * rng.uniform(0.93, 1.07) if field_mm is None else float(field_mm)
    mm_per_px_out = fov_long / max(rows, cols)
    factor = min(1.0, _WORK_LONG_SIDE / max(rows, cols))
    work = (max(round(rows * factor), 8), max(round(cols * factor), 8))
    mm_per_px = fov_long / max(work)
    canvas = Canvas(
        work,
        mm_per_px,
        rotation_deg=float(rng.normal(0.0, 3.0)),
        shift_mm=(float(rng.normal(0.0, 0.02 * fov_long)), float(rng.normal(0.0, 0.02 * fov_long))),
    )
    if view == "LAT":
        if body_part not in _LATERALS:
            raise ValueError(f"no lateral view of '{body_part}'; lateral views exist for {', '.join(_LATERALS)}")
        _LATERALS[body_part](canvas, body, rng)
    else:
        _PARTS[body_part](canvas, body, rng)
    if finding is not None:
        # Its own generator: the rest of the image is then the one drawn without the finding.
        draw_finding(canvas, body, finding, rng if finding_rng is None else finding_rng)
    att = canvas.render(mm_per_px)
    # Trabecular texture: low-amplitude band-passed noise modulating bone only.
    texture: np.ndarray = cv2.GaussianBlur(
        rng.standard_normal(work, dtype=np.float32), (0, 0), max(1.2 / mm_per_px, 0.7)
    )
    texture /= max(float(texture.std()), 1e-6)
    bone = canvas.layers["bone"]
    att += 0.06 * texture * np.clip(cv2.GaussianBlur(bone, (0, 0), 1.0), 0, 0.6)
    masks = {name: m for name, m in canvas.masks.items() if not name.startswith("_")}
    if body_part in SIDED and laterality == "L":
        att = np.ascontiguousarray(att[:, ::-1])
        masks = {name: np.ascontiguousarray(m[:, ::-1]) for name, m in masks.items()}
    return att, masks, mm_per_px_out


def _add_markers(att: np.ndarray, laterality: str | None, rng: np.random.Generator) -> None:
    """A lead side marker in a corner, as technologists place them."""
    if laterality is None or rng.random() < 0.25:
        return
    rows, cols = att.shape
    scale = max(rows, cols) / 400.0
    x = int(cols * (0.06 if rng.random() < 0.5 else 0.86))
    y = int(rows * (0.1 if rng.random() < 0.5 else 0.94))
    marker = np.zeros(att.shape, np.uint8)  # putText draws on 8-bit images only
    cv2.putText(marker, laterality, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 1.2 * scale, 255, max(int(3 * scale), 1))
    att += marker.astype(np.float32) / 255.0


def _collimate(att: np.ndarray, rng: np.random.Generator) -> None:
    """Shutter edges: outside the collimated field the detector saw little radiation (bright in MONOCHROME2)."""
    rows, cols = att.shape
    top, bottom = int(rows * rng.uniform(0, 0.08)), int(rows * (1 - rng.uniform(0, 0.08)))
    left, right = int(cols * rng.uniform(0, 0.1)), int(cols * (1 - rng.uniform(0, 0.1)))
    outside = np.ones_like(att)
    outside[top:bottom, left:right] = 0.0
    level = float(rng.uniform(1.1, 1.4))
    att[:] = att * (1 - outside) + (level + 0.2 * att) * outside


_GRAIN_LONG_SIDE = 1024


def _grain(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Unit-variance detector noise; above 1024 pixels it is drawn coarser and resized up (drawing normals
    dominates the cost of a large image, and real detector noise is correlated over a few pixels anyway)."""
    rows, cols = shape
    factor = min(1.0, _GRAIN_LONG_SIDE / max(rows, cols))
    if factor == 1.0:
        return rng.standard_normal(shape, dtype=np.float32)
    small = rng.standard_normal((max(round(rows * factor), 1), max(round(cols * factor), 1)), dtype=np.float32)
    grain: np.ndarray = cv2.resize(small, (cols, rows), interpolation=cv2.INTER_LINEAR)
    grain /= max(float(grain[::4, ::4].std()), 1e-6)
    return grain


def make_radiograph(
    body_part: str,
    age: float,
    sex: str | None,
    size: int | tuple[int, int],
    rng: np.random.Generator,
    *,
    bits_stored: int = 12,
    laterality: str | None = None,
    collimate: bool | None = None,
    field_mm: float | None = None,
    view: str | None = None,
    finding: str | None = None,
    finding_rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One synthetic radiograph as stored MONOCHROME2 values (higher = more attenuation).

    Args:
        body_part: one of `BODY_PARTS`.
        age: age in years (fractions allowed); drives size, growth plates, ossification and bone density.
        sex: "M", "F", "O" or None; drives pelvis shape and breast shadows.
        size: long side in pixels (aspect from the usual detector) or (rows, cols).
        rng: the only source of randomness, so a seeded generator gives identical pixels.
        bits_stored: values use the range 0 .. 2**bits_stored - 1.
        laterality: "L" mirrors a sided part (hand, knee, foot, shoulder) and prints an "L" marker.
        collimate: add shutter edges (None: at random for extremities).
        view: "LAT" draws a lateral projection where `VIEWS` allows it; anything else a frontal one.
        field_mm: long side of the field of view in mm (pixel spacing = field_mm / long side); None draws a
            typical one for the body part and age.
        finding: a lung finding of `FINDINGS` ("nodule", "consolidation") to draw inside the lungs (chest only),
            before blur, detector response and noise like the rest of the anatomy.
        finding_rng: draws the finding's size, density and place (default `rng`); a generator of its own leaves
            every other pixel as it is without the finding, before noise.

    Returns:
        (uint16 image of shape (rows, cols), {structure: uint8 mask 0/255 of the same shape}); masks for
        the structures in `MASK_STRUCTURES` (e.g. "lungs" and "heart" for the chest, "bones" for the hand),
        plus `FINDING_MASK` ("finding") with a finding.
    """
    if body_part not in _PARTS:
        raise ValueError(f"unknown body part '{body_part}'; known: {', '.join(BODY_PARTS)}")
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be between 8 and 16, got {bits_stored}")
    shape = default_shape(body_part, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(shape) < 8:
        raise ValueError(f"image size must be at least 8 pixels per side, got {shape}")
    if finding is not None and body_part != "chest":
        raise ValueError(f"lung findings are drawn on chest radiographs, not on '{body_part}'")
    att, masks, _ = render_attenuation(
        body_part,
        age,
        sex,
        shape,
        rng,
        laterality=laterality,
        field_mm=field_mm,
        view=view,
        finding=finding,
        finding_rng=finding_rng,
    )
    if collimate is None:
        collimate = body_part in SIDED and rng.random() < 0.5
    if collimate:
        _collimate(att, rng)
    _add_markers(att, laterality if body_part in SIDED else None, rng)
    # Heel effect: exposure falls off slightly along the tube axis.
    att += np.linspace(-0.04, 0.04, att.shape[0], dtype=np.float32)[:, None] * float(rng.choice([-1, 1]))
    rows, cols = shape
    image = cv2.resize(att, (cols, rows), interpolation=cv2.INTER_LINEAR) if att.shape != shape else att.copy()
    top = float(2**bits_stored - 1)
    base = top * float(rng.uniform(0.03, 0.12))
    gain = top * float(rng.uniform(0.45, 0.62))
    # Quantum noise grows where fewer photons arrive (behind more attenuation). In-place float32 work
    # keeps a 5-megapixel image at a few tens of milliseconds.
    noise = _grain(shape, rng)
    sigma = np.minimum(image, np.float32(2.0))
    np.maximum(sigma, np.float32(0.0), out=sigma)
    sigma += 1.0
    sigma *= top * 0.004
    noise *= sigma
    image *= gain
    image += base + 0.5  # + 0.5: the uint16 cast below truncates, so this rounds
    image += noise
    np.minimum(image, np.float32(top + 0.5), out=image)
    np.maximum(image, np.float32(0.0), out=image)
    out = image.astype(np.uint16)
    full_masks: dict[str, np.ndarray] = {}
    for name in (*MASK_STRUCTURES.get(body_part, ()), *((FINDING_MASK,) if finding is not None else ())):
        m: np.ndarray = masks.get(name, np.zeros(att.shape, bool)).astype(np.float32)
        if m.shape != shape:
            m = cv2.resize(m, (cols, rows), interpolation=cv2.INTER_LINEAR)
        full_masks[name] = np.where(m >= 0.5, 255, 0).astype(np.uint8)
    return out, full_masks
