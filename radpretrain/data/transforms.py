"""Radiograph-native augmentation of stored 16-bit images into the views and labels that pretext tasks ask for."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import albumentations as A
import cv2
import numpy as np

from radpretrain import intensity
from radpretrain.data import letterbox
from radpretrain.errors import ConfigError
from radpretrain.registry import did_you_mean
from radpretrain.shards.format import LABEL_NAMES, LOCAL_VIEWS, STRONG_VIEWS, VIEW_NAMES

if TYPE_CHECKING:
    from radpretrain.data.positives import Partners

log = logging.getLogger(__name__)

#: Label tensors every sample carries: long, -1 where missing (ignore_index of the metadata task).
MISSING = -1


@dataclass
class AugmentConfig:
    """One augmentation policy on a stored 16-bit radiograph (crop -> window -> pixel ops -> normalise).

    There are no colour operations and horizontal flips are off by default: laterality carries meaning
    in radiographs (a heart on the right is a finding, not an augmentation). Intensity values are in
    the [0, 1] windowed scale unless said otherwise.
    """

    #: "random_crop": random resized crop (area fraction `crop_scale`, aspect `crop_ratio`) of the stored
    #: image; "letterbox": the whole image fitted keeping its aspect ratio, windowed, then centred on a
    #: square padded with `letterbox.FILL` (0 in [0, 1]): `data.letterbox`, as cohort cases are.
    resize: Literal["random_crop", "letterbox"] = "random_crop"
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    #: Window centre moves by up to this fraction of the stored window width, either way.
    window_center_jitter: float = 0.15
    #: Window width is multiplied by a log-uniform factor in [1 / (1 + j), 1 + j].
    window_width_jitter: float = 0.3
    #: Gamma exponent range (x ** gamma on the windowed image) and its probability.
    gamma: tuple[float, float] = (0.7, 1.4)
    gamma_p: float = 0.5
    #: Gaussian noise standard deviation range and probability.
    noise_std: tuple[float, float] = (0.0, 0.03)
    noise_p: float = 0.3
    #: Gaussian blur sigma range (pixels of the output image) and probability.
    blur_sigma: tuple[float, float] = (0.1, 1.2)
    blur_p: float = 0.3
    #: Small affine: rotation in degrees (either way), translation as a fraction of the size, scale range.
    rotate_degrees: float = 10.0
    translate: float = 0.05
    scale: tuple[float, float] = (0.9, 1.1)
    affine_p: float = 0.5
    #: Contrast-limited adaptive histogram equalisation (quantises to 8 bits), off by default.
    clahe_p: float = 0.0
    clahe_clip: float = 2.0
    #: Horizontal flip probability; keep 0 unless laterality does not matter for your downstream tasks.
    hflip_p: float = 0.0

    @classmethod
    def strong(cls) -> AugmentConfig:
        """The contrastive views' policy (the defaults)."""
        return cls()

    @classmethod
    def light(cls) -> AugmentConfig:
        """A mild crop at the stored window; nothing else."""
        return cls(
            crop_scale=(0.7, 1.0),
            window_center_jitter=0.0,
            window_width_jitter=0.0,
            gamma_p=0.0,
            noise_p=0.0,
            blur_p=0.0,
            affine_p=0.0,
        )

    @classmethod
    def local(cls) -> AugmentConfig:
        """DINO's local crops: the strong policy on small parts of the image (5-40 % of its area)."""
        return cls(crop_scale=(0.05, 0.4))

    @classmethod
    def evaluation(cls) -> AugmentConfig:
        """No randomness: the whole image letterboxed at the stored window (probes, feature extraction)."""
        return dataclasses.replace(cls.light(), resize="letterbox")

    def validate(self) -> None:
        def pair(name: str, low: float, high: float | None = None) -> None:
            a, b = getattr(self, name)
            if not (low <= a <= b and (high is None or b <= high)):
                upper = f" and at most {high}" if high is not None else ""
                raise ConfigError(f"augment {name} must be [min, max] with {low} <= min <= max{upper}, got {[a, b]}")

        pair("crop_scale", 0.01, 1.0)
        pair("crop_ratio", 0.1)
        pair("gamma", 0.05)
        pair("noise_std", 0.0, 1.0)
        pair("blur_sigma", 0.0)
        pair("scale", 0.1)
        for name in ("gamma_p", "noise_p", "blur_p", "affine_p", "clahe_p", "hflip_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment {name} is a probability and must be within [0, 1], got {value}")
        for name in ("window_center_jitter", "window_width_jitter", "rotate_degrees", "translate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augment {name} must be >= 0, got {getattr(self, name)}")
        if self.clahe_clip <= 0:
            raise ConfigError(f"augment clahe_clip must be > 0, got {self.clahe_clip}")


#: The view made from the partner image when `data.positives` pairs two images (radpretrain.data.positives):
#: the second strong view. The first, the light one and DINO's local crops stay with the sample's own image.
PARTNER_VIEWS: tuple[str, ...] = (STRONG_VIEWS[1],)

#: A local view's side as a fraction of the global one: DINO's 96 px local crops of 224 px images.
LOCAL_FRACTION = 3 / 7
#: Automatic local sizes are multiples of this, so ViT patch embeddings (16 px) and CNN strides fit them.
LOCAL_MULTIPLE = 16


@dataclass
class ViewsConfig:
    """The policies of the strong views ("view0", "view1"), the light one ("plain") and the local crops ("local0"..)."""

    strong: AugmentConfig = field(default_factory=AugmentConfig.strong)
    plain: AugmentConfig = field(default_factory=AugmentConfig.light)
    local: AugmentConfig = field(default_factory=AugmentConfig.local)
    #: Side of the local views in pixels; 0: 3/7 of data.image_size rounded to a multiple of 16 (96 for 224).
    local_size: int = 0

    def validate(self) -> None:
        self.strong.validate()
        self.plain.validate()
        self.local.validate()
        if isinstance(self.local_size, bool) or not isinstance(self.local_size, int) or self.local_size < 0:
            raise ConfigError(
                f"augment local_size must be a whole number of pixels >= 0 (0: automatic), got {self.local_size!r}"
            )


def local_view_size(image_size: int, local_size: int = 0) -> int:
    """The side of the local views: `local_size`, or 3/7 of `image_size` rounded to a multiple of 16 (at least 16)."""
    if local_size:
        return local_size
    return max(LOCAL_MULTIPLE, round(image_size * LOCAL_FRACTION / LOCAL_MULTIPLE) * LOCAL_MULTIPLE)


def stored_window(pixels: np.ndarray, meta: Mapping[str, Any]) -> tuple[float, float]:
    """(centre, width) in stored units: the shard's window, else its robust range, else the image's.

    The shard's window is `intensity.image_window` of the file (written by the sharder).
    """
    center, width = meta.get("window_center"), meta.get("window_width")
    if center is not None and width is not None and float(width) > 0:
        return float(center), float(width)
    low, high = meta.get("intensity_low"), meta.get("intensity_high")
    if low is None or high is None or float(high) <= float(low):
        return intensity.robust_window(pixels)
    return intensity.range_window(low, high)


def jitter_window(center: float, width: float, cfg: AugmentConfig, rng: np.random.Generator) -> tuple[float, float]:
    """A random window around (centre, width): centre +- jitter * width, width times a log-uniform factor."""
    if cfg.window_center_jitter > 0:
        center = center + width * rng.uniform(-cfg.window_center_jitter, cfg.window_center_jitter)
    if cfg.window_width_jitter > 0:
        bound = math.log1p(cfg.window_width_jitter)
        width = width * math.exp(rng.uniform(-bound, bound))
    return center, width


#: A crop that shrinks by at most this factor on both axes is resized bilinearly; beyond it, by area.
LINEAR_MAX_SHRINK = 2.0


class RadiographCrop(A.RandomResizedCrop):
    """albumentations' random resized crop, resized bilinearly up to a 2x shrink and by area averaging beyond.

    Up to 2x, bilinear stays within 1.8 per mille of the window of a Lanczos resize, where area averaging
    stays within 1.4 (real and synthetic radiographs, `bench/crop_resize.py`): under half an 8-bit grey
    level, for a fifth of the time (0.05 ms against 0.2-0.3 for a 280-390 px crop to 224). Beyond 2x it
    skips pixels and aliases fine trabecular texture, so larger shrinks (views from full-size images)
    keep INTER_AREA.
    """

    def apply(self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        x_min, y_min, x_max, y_max = crop_coords
        crop = img[y_min:y_max, x_min:x_max]
        return resize_view(crop, self.size)


def resize_view(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`image` resized to (height, width) `size`: bilinear up to a LINEAR_MAX_SHRINK shrink, area beyond."""
    shrink = max(image.shape[0] / size[0], image.shape[1] / size[1])
    interpolation = cv2.INTER_LINEAR if shrink <= LINEAR_MAX_SHRINK else cv2.INTER_AREA
    return cv2.resize(image, size[::-1], interpolation=interpolation)


class RadiographAugment:
    """One policy as a callable: (float32 HxW stored values, stored window) -> float32 (1, S, S) encoder input.

    Order: albumentations' crop (or `letterbox.fit`) of the stored image -> the jittered window to [0, 1]
    and gamma (-> `letterbox.pad`) -> a small affine -> Gaussian blur -> Gaussian noise (clipped to [0, 1])
    -> CLAHE / flip (albumentations) -> `intensity.normalize`. The window, gamma, affine, blur and noise are
    single OpenCV calls on the view rather than albumentations transforms: albumentations spends 0.1-0.15 ms per applied
    transform on its own bookkeeping (measured on 224 px views: Affine 0.25 ms vs warpAffine 0.10,
    GaussNoise 0.26 vs cv2.randn 0.13, RandomGamma's numpy power 0.30 vs cv2.pow 0.06), which is most of a
    view's cost.
    All randomness comes from the `rng`/`py_random` pair given to `set_random_state`, so a seeded pair
    gives the same views.
    """

    def __init__(self, cfg: AugmentConfig, image_size: int) -> None:
        cfg.validate()
        if image_size < 8:
            raise ConfigError(f"image_size must be at least 8 pixels, got {image_size}")
        self.cfg = cfg
        self.image_size = image_size
        size = (image_size, image_size)
        geometry: list[A.BasicTransform] = []
        if cfg.resize != "letterbox":  # the letterbox is `data.letterbox`, shared with cohorts, in __call__
            geometry = [RadiographCrop(size=size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, p=1.0)]
        self.geometry = A.Compose(geometry)
        finish: list[A.BasicTransform] = []
        if cfg.clahe_p > 0:
            finish.append(A.CLAHE(clip_limit=(1.0, cfg.clahe_clip), p=cfg.clahe_p))
        if cfg.hflip_p > 0:
            finish.append(A.HorizontalFlip(p=cfg.hflip_p))
        self.finish = A.Compose(finish) if finish else None
        self.set_random_state(np.random.default_rng(0), random.Random(0))

    def set_random_state(self, rng: np.random.Generator, py_random: random.Random) -> None:
        # One shared stream: albumentations' own seeding gives every transform an identical copy,
        # which would make their random draws move together.
        self.rng = rng
        self.geometry.set_random_state(rng, py_random)
        if self.finish is not None:
            self.finish.set_random_state(rng, py_random)

    def __call__(self, pixels: np.ndarray, window: tuple[float, float]) -> np.ndarray:
        if pixels.ndim != 2:
            raise ValueError(f"expected a 2-D grayscale image, got shape {pixels.shape}")
        size = (self.image_size, self.image_size)
        image: np.ndarray
        if self.cfg.resize == "letterbox":
            image = letterbox.fit(pixels, size)
        else:
            image = np.asarray(self.geometry(image=pixels)["image"], dtype=np.float32)
        if np.shares_memory(image, pixels):  # an image already at size: the sample's own array, shared by views
            image = image.copy()
        image = self.window(image, window)
        if self.cfg.resize == "letterbox":  # padded after the window, so the padding is FILL whatever the window
            image, _ = letterbox.pad(image, size)
        cfg, rng = self.cfg, self.rng
        if cfg.affine_p > 0 and rng.random() < cfg.affine_p:
            image = cv2.warpAffine(
                image, self.affine_matrix(), image.shape[::-1], flags=cv2.INTER_LINEAR, borderValue=0.0
            )
        if cfg.blur_p > 0 and rng.random() < cfg.blur_p:
            sigma = rng.uniform(*cfg.blur_sigma)
            if sigma > 0:
                image = cv2.GaussianBlur(image, (0, 0), sigma)
        if cfg.noise_p > 0 and rng.random() < cfg.noise_p:
            noise = np.empty_like(image)
            cv2.setRNGSeed(int(rng.integers(2**31)))  # OpenCV's generator, seeded from ours: 4x numpy's speed
            cv2.randn(noise, np.zeros(1), np.full(1, rng.uniform(*cfg.noise_std)))
            image += noise
            # Only noise leaves [0, 1]: the window clips, and gamma, the affine and the blur are convex.
            np.clip(image, 0.0, 1.0, out=image)
        if self.finish is not None:
            image = np.asarray(self.finish(image=image)["image"], dtype=np.float32)
        return intensity.normalize_(image)[None]

    def window(self, image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
        """The jittered window (to [0, 1]) and, with probability gamma_p, a random gamma, in place."""
        intensity.apply_window_(image, *jitter_window(window[0], window[1], self.cfg, self.rng))
        if self.cfg.gamma_p > 0 and self.rng.random() < self.cfg.gamma_p:
            cv2.pow(image, self.rng.uniform(*self.cfg.gamma), image)
        return image

    def affine_matrix(self) -> np.ndarray:
        """A 2x3 map: rotation and scale about the centre, then a shift (a fraction of the size)."""
        cfg, rng, size = self.cfg, self.rng, self.image_size
        angle = rng.uniform(-cfg.rotate_degrees, cfg.rotate_degrees)
        centre = ((size - 1) / 2.0, (size - 1) / 2.0)
        matrix = np.asarray(cv2.getRotationMatrix2D(centre, angle, rng.uniform(*cfg.scale)), dtype=np.float64)
        matrix[:, 2] += rng.uniform(-cfg.translate, cfg.translate, size=2) * size
        return matrix


class ViewMaker:
    """Makes the named views of a stored radiograph with the strong, light and local policies.

    Args:
        view_names: Any of "view0", "view1" (strong policy), "plain" (light policy) and "local0".."local7"
            (local policy, at `local_view_size(image_size, cfg.local_size)`).
        cfg: The policies.
        image_size: Side of the square output views (but the local ones).
        seed: Seed of the random stream (reseed per worker with `reseed`).
    """

    def __init__(self, view_names: Sequence[str], cfg: ViewsConfig, image_size: int, seed: int = 0) -> None:
        for name in view_names:
            if name not in VIEW_NAMES:
                raise ConfigError(
                    f"Unknown view '{name}'.{did_you_mean(name, VIEW_NAMES)} Known: {', '.join(VIEW_NAMES)}"
                )
        if not view_names:
            raise ConfigError("no views requested; a task must ask for at least one of " + ", ".join(VIEW_NAMES))
        cfg.validate()
        self.view_names = tuple(dict.fromkeys(view_names))
        self.strong = RadiographAugment(cfg.strong, image_size)
        self.light = RadiographAugment(cfg.plain, image_size)
        self.local = RadiographAugment(cfg.local, local_view_size(image_size, cfg.local_size))
        self.policy = {name: self.policy_of(name) for name in self.view_names}
        self.reseed(seed)

    def policy_of(self, name: str) -> RadiographAugment:
        if name in STRONG_VIEWS:
            return self.strong
        return self.local if name in LOCAL_VIEWS else self.light

    def reseed(self, seed: int | Sequence[int]) -> None:
        self.set_random_state(np.random.default_rng(seed))

    def set_random_state(self, rng: np.random.Generator) -> None:
        """Draw every view from `rng` (and a Python stream seeded from it, which albumentations also uses)."""
        py_random = random.Random(int(rng.integers(2**63)))
        self.strong.set_random_state(rng, py_random)
        self.light.set_random_state(rng, py_random)
        self.local.set_random_state(rng, py_random)

    def __call__(
        self, pixels: np.ndarray, meta: Mapping[str, Any], partner: tuple[np.ndarray, Mapping[str, Any]] | None = None
    ) -> dict[str, np.ndarray]:
        """The views of one image; with `partner` (pixels, meta of another image) the PARTNER_VIEWS come from it."""
        # float once per image, shared by its views (windowing is float); views drawn in the same order either way
        own = (np.asarray(pixels, dtype=np.float32), stored_window(pixels, meta))
        other = own if partner is None else (np.asarray(partner[0], dtype=np.float32), stored_window(*partner))
        return {name: self.policy[name](*(other if name in PARTNER_VIEWS else own)) for name in self.view_names}


def make_views(
    sample: Mapping[str, Any],
    view_names: Sequence[str],
    cfg: ViewsConfig,
    *,
    image_size: int = 224,
    rng: int | np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """One-off views of a decoded sample ({"pixels": uint16 HxW, "meta": dict}) -> {name: float32 (1, S, S)}.

    Builds the policies on every call; pipelines use `build_sample_fn`, which builds them once.
    """
    maker = ViewMaker(view_names, cfg, image_size)
    maker.set_random_state(rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng))
    return maker(sample["pixels"], sample["meta"])


def encode_labels(meta: Mapping[str, Any], vocab: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Class indices into the manifest's vocab for LABEL_NAMES; -1 when missing, "unknown" or not in the vocab."""
    labels = {}
    for name in LABEL_NAMES:
        value = meta.get(name)
        classes = list(vocab.get(name, ()))
        labels[name] = classes.index(value) if value not in (None, "unknown") and value in classes else MISSING
    return labels


class SampleFn:
    """The reader pipeline's `map_fn`: decoded sample -> {view: float tensor (1, S, S), label: long tensor}.

    The random stream is re-derived inside each DataLoader worker and process rank from `seed`, the
    worker's seed (which the DataLoader draws afresh every epoch from torch's seeded generator) and the
    rank, so workers never repeat each other's augmentations and a seeded run repeats itself.

    With `partners` (`data.positives.Partners`), a sample whose patient or study has other train images
    gets one of them, drawn from a second stream seeded the same way, for the PARTNER_VIEWS; the output
    then also carries "partner": the key of the image those views came from (the sample's own key if none).
    """

    def __init__(
        self,
        view_names: Sequence[str],
        cfg: ViewsConfig,
        vocab: Mapping[str, Sequence[str]],
        image_size: int,
        seed: int = 0,
        partners: Partners | None = None,
    ) -> None:
        self.maker = ViewMaker(view_names, cfg, image_size, seed)
        self.vocab = {name: list(vocab.get(name, ())) for name in LABEL_NAMES}
        self.seed = seed
        self.partners = partners
        self.partner_rng = np.random.default_rng([seed, 0, 0, 1])
        self.unread = 0
        self._stream: tuple[int, int | None] | None = None

    def _ensure_stream(self) -> None:
        import torch
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        stream = (os.getpid(), None if info is None else int(info.seed))
        if stream != self._stream:
            rank = (
                torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", 0))
            )
            worker_seed = 0 if info is None else int(info.seed) % 2**63
            self.maker.reseed([self.seed, rank, worker_seed])
            # A stream of its own: partner draws leave the augmentation stream as it is
            self.partner_rng = np.random.default_rng([self.seed, rank, worker_seed, 1])
            self._stream = stream

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        self._ensure_stream()
        partner = self.partner_of(sample) if self.partners is not None else None
        pair = None if partner is None else (partner["pixels"], partner["meta"])
        views = self.maker(sample["pixels"], sample["meta"], pair)
        out: dict[str, Any] = {name: torch.from_numpy(view) for name, view in views.items()}
        for name, index in encode_labels(sample["meta"], self.vocab).items():
            out[name] = torch.tensor(index, dtype=torch.long)
        if self.partners is not None:
            out["partner"] = sample["key"] if partner is None else partner["key"]
        return out

    def partner_of(self, sample: Mapping[str, Any]) -> dict[str, Any] | None:
        """Another image of the sample's group, decoded; None when it has none (or it cannot be read)."""
        assert self.partners is not None
        row = self.partners.draw(sample["key"], self.partner_rng)
        if row is None:
            return None
        try:
            return self.partners.read(row)
        except (OSError, ValueError) as exc:  # the shard changed or broke since the index: pair with itself
            self.unread += 1
            if self.unread <= 3:
                log.warning("positives: a partner image could not be read (%s); the sample pairs with itself", exc)
            return None


def views_config(cfg: ViewsConfig | Mapping[str, Any] | None) -> ViewsConfig:
    """A ViewsConfig from itself, None (defaults) or a plain mapping like {"strong": {"crop_scale": [0.5, 1]}}."""
    if cfg is None:
        return ViewsConfig()
    if isinstance(cfg, ViewsConfig):
        cfg.validate()
        return cfg
    from radpretrain.config import build

    return build(ViewsConfig, cfg, prefix="augment.")


def build_sample_fn(
    view_names: Sequence[str],
    cfg: ViewsConfig | Mapping[str, Any] | None,
    vocab: Mapping[str, Sequence[str]],
    image_size: int,
    seed: int = 0,
    partners: Partners | None = None,
) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """The `map_fn` for `shards.reader.build_pipeline`: views (float32 tensors (1, S, S)) + long labels.

    Output keys: each of `view_names`, plus "body_part", "age_bucket", "sex", "view" (indices into the
    manifest's `vocab`, -1 where missing). Batch it with a DataLoader (`batch_size=B`) to get (B, 1, S, S)
    and (B,) tensors. `cfg` may be a plain mapping (a config's `augment:` section), checked by type; for
    deterministic probe features use `ViewsConfig(plain=AugmentConfig.evaluation())` with ("plain",).
    `partners` (`data.positives.open_partners`) takes the second strong view from another image of the
    sample's patient or study, and adds "partner" (that image's key) to the output.
    """
    return SampleFn(view_names, views_config(cfg), vocab, image_size, seed, partners)
