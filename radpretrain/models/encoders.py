"""Encoders are plain timm models with one input channel: build by name, find stages, export and load."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models._manipulate import group_parameters
from torch import nn

from radpretrain import intensity
from radpretrain.errors import ConfigError
from radpretrain.files import atomic_path, write_text
from radpretrain.models import cbr  # noqa: F401  (registers the CBR names with timm before any is built or checked)
from radpretrain.registry import did_you_mean

#: Documented encoder names (any other timm architecture name also builds):
#: - "resnet18", "resnet50": torchvision-style ResNets (He et al. 2016); 512 / 2048 features.
#: - "vit_small_patch16_224": ViT-S/16 (Dosovitskiy et al. 2021); pass `img_size` for other input sizes.
#: - "test_resnet", "test_vit": timm's tiny test models (seconds on a CPU at 32-64 px) for tests and demos.
#: - "cbr_large_tall", "cbr_large_wide", "cbr_small", "cbr_tiny": the CBR family of Transfusion (Raghu et
#:   al. 2019, https://arxiv.org/abs/1902.07208), stacks of conv-batchnorm-ReLU-maxpool blocks.
ENCODERS: tuple[str, ...] = (
    "resnet18",
    "resnet50",
    "vit_small_patch16_224",
    "test_resnet",
    "test_vit",
    "cbr_large_tall",
    "cbr_large_wide",
    "cbr_small",
    "cbr_tiny",
)

WEIGHTS_FILE = "encoder.safetensors"
CARD_FILE = "encoder.json"
CARD_VERSION = 1
#: Keys that `save_encoder` writes itself; a card passed in may not set them.
RESERVED_CARD_KEYS = (
    "card_version",
    "timm_name",
    "in_chans",
    "img_size",
    "build_kwargs",
    "num_features",
    "intensity_convention",
    "weights_file",
    "weights_sha256",
)

# --------------------------------------------------------------------------------------------------------------
# Building, stages, export and import.
# --------------------------------------------------------------------------------------------------------------


def check_encoder_name(name: str) -> None:
    """ConfigError (with the closest names) unless timm knows the architecture `name`."""
    if not timm.is_model(name):
        known = sorted(set(ENCODERS) | set(timm.list_models()))
        raise ConfigError(
            f"Unknown encoder '{name}'.{did_you_mean(name, known)} Documented: {', '.join(ENCODERS)} "
            "(any timm architecture name also works)"
        )


def build_encoder(name: str, *, in_chans: int = 1, img_size: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised timm encoder without classifier: forward(x) -> (B, num_features).

    Args:
        name: A timm architecture name, e.g. one of `ENCODERS`.
        in_chans: Input channels (radiographs have one).
        img_size: Input size for models with a fixed size (ViTs: sets the position embedding); CNNs take
            any size and only record it.
        **kwargs: Further timm constructor arguments (e.g. drop_path_rate=0.1); must be JSON values so the
            exported encoder can be rebuilt.

    Returns:
        The timm model, with `.num_features`, `.feature_info` and `forward_intermediates`, and a
        `radpretrain_build` dict that `save_encoder` writes into the encoder card.
    """
    check_encoder_name(name)
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ConfigError(f"in_chans must be a positive integer, got {in_chans!r}")
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 8):
        raise ConfigError(f"img_size must be an integer of at least 8 pixels (or null), got {img_size!r}")
    for banned in ("pretrained", "num_classes", "features_only", "pretrained_cfg_overlay"):
        if banned in kwargs:
            raise ConfigError(
                f"encoder option '{banned}' is fixed by radpretrain (pretrained=False, num_classes=0, "
                "no downloads); remove it from the config"
            )
    try:
        json.dumps(kwargs)
    except TypeError:
        raise ConfigError(f"encoder options must be plain values (numbers, strings, lists), got {kwargs!r}") from None
    cfg = timm.models.get_pretrained_cfg(name)
    extra = dict(kwargs)
    if img_size is not None and cfg is not None and cfg.fixed_input_size:
        extra["img_size"] = img_size
    try:
        model = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0, **extra)
    except TypeError as exc:
        raise ConfigError(f"encoder '{name}' does not accept the options {sorted(kwargs)}: {exc}") from None
    _check_patch_size(model, name, img_size)
    # A plain dict attribute (not a submodule or buffer): how save_encoder describes the model for a rebuild.
    build = {"name": name, "in_chans": in_chans, "img_size": img_size, "kwargs": kwargs}
    model.radpretrain_build = build  # type: ignore[assignment]
    return model


def _check_patch_size(model: nn.Module, name: str, img_size: int | None) -> None:
    """A ViT's patch embedding silently drops the rows and columns past the last whole patch; refuse such sizes."""
    patch_embed = getattr(model, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    if img_size is None or patch is None or getattr(patch_embed, "dynamic_img_pad", False):
        return
    sides = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    step = max(int(s) for s in sides)
    if any(img_size % int(s) for s in sides):
        near = " or ".join(str(n) for n in sorted({max(step, img_size // step * step), (img_size // step + 1) * step}))
        raise ConfigError(
            f"encoder '{name}' cannot take {img_size} px inputs: it cuts images into {step} px patches, so the size "
            f"must be a multiple of {step}, e.g. {near} (data.image_size for pretrain, size for finetune)"
        )


def unwrap_encoder(encoder: nn.Module) -> nn.Module:
    """The timm model inside DistributedDataParallel or torch.compile wrappers."""
    while True:
        if hasattr(encoder, "_orig_mod") and isinstance(encoder._orig_mod, nn.Module):
            encoder = encoder._orig_mod
        elif isinstance(encoder, nn.parallel.DistributedDataParallel | nn.DataParallel):
            encoder = encoder.module
        else:
            return encoder


def encoder_stages(encoder: nn.Module) -> list[list[str]]:
    """Name prefixes of each stage's parameters and buffers, input side first.

    Stages are timm's coarse parameter groups (stem, then one per stage or transformer block; the final
    norm joins the last block). A parameter or buffer named `n` belongs to the stage holding a prefix `p`
    with `n == p` or `n.startswith(p + ".")`. Used by transfusion:k, partial and frozen transfer.
    """
    encoder = unwrap_encoder(encoder)
    matcher: Callable[..., Any] | None = getattr(encoder, "group_matcher", None)
    if matcher is None:
        raise ConfigError(f"{type(encoder).__name__} has no timm group_matcher; use a timm encoder")
    groups = group_parameters(encoder, matcher(coarse=True))
    ordered = [groups[key] for key in sorted(groups)]
    owner = {name: index for index, names in enumerate(ordered) for name in names}
    stages: list[list[str]] = []
    for index, names in enumerate(ordered):
        prefixes: list[str] = []
        for name in names:
            parts = name.split(".")
            # The shortest module path that holds only this stage's parameters.
            for depth in range(1, len(parts) + 1):
                prefix = ".".join(parts[:depth])
                inside = [n for n in owner if n == prefix or n.startswith(prefix + ".")]
                if all(owner[n] == index for n in inside):
                    break
            if prefix not in prefixes:
                prefixes.append(prefix)
        stages.append(prefixes)
    return stages


def save_encoder(encoder: nn.Module, out_dir: str | Path, card: dict) -> None:
    """Write `encoder.safetensors` (timm's state-dict keys) and `encoder.json` (card + how to rebuild it).

    The card holds what the caller knows (pretext tasks, data summary, steps, input_size ...); this adds
    the timm name, in_chans, img_size, build options, num_features, the intensity convention and the
    weights' SHA-256. Both files are written to temporary names and renamed, weights first, so an
    `encoder.json` only ever describes complete weights.
    """
    encoder = unwrap_encoder(encoder)
    build = getattr(encoder, "radpretrain_build", None)
    if not isinstance(build, dict):
        raise ConfigError("this encoder was not made by radpretrain.models.encoders.build_encoder; build it there")
    clash = sorted(set(card) & set(RESERVED_CARD_KEYS))
    if clash:
        raise ValueError(f"card keys {clash} are written by save_encoder itself; remove them from the card")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in encoder.state_dict().items()}
    weights = out / WEIGHTS_FILE
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "timm_name": build["name"]})
    full = {
        **card,
        "card_version": CARD_VERSION,
        "timm_name": build["name"],
        "in_chans": build["in_chans"],
        "img_size": build["img_size"],
        "build_kwargs": build["kwargs"],
        "num_features": int(getattr(encoder, "num_features", 0)),
        "intensity_convention": intensity.CONVENTION,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": _sha256(weights),
    }
    try:
        text = json.dumps(full, indent=2, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"encoder card values must be JSON (numbers, strings, lists, dicts): {exc}") from None
    write_text(out / CARD_FILE, text + "\n")


def read_card(path: str | Path) -> dict:
    """The contents of `encoder.json` in an encoder folder (or the json/safetensors file itself)."""
    card_path = _folder(path) / CARD_FILE
    if not card_path.is_file():
        raise ConfigError(f"no {CARD_FILE} in {card_path.parent}; give the folder written by `radpretrain export`")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{card_path} is not valid JSON ({exc}); export the encoder again") from None
    if not isinstance(card, dict):
        raise ConfigError(f"{card_path} must hold a JSON object; export the encoder again")
    missing = [key for key in ("card_version", "timm_name", "in_chans", "weights_sha256") if key not in card]
    if missing:
        raise ConfigError(f"{card_path} lacks {', '.join(missing)}; it was not written by radpretrain export")
    if not isinstance(card["card_version"], int) or card["card_version"] > CARD_VERSION:
        raise ConfigError(
            f"{card_path} has card_version {card['card_version']!r}; this radpretrain reads up to "
            f"{CARD_VERSION}, upgrade radpretrain"
        )
    return card


def load_encoder(path: str | Path) -> nn.Module:
    """Rebuild an exported encoder by name from `encoder.json` and load its safetensors weights strictly.

    Nothing is unpickled. The weights' checksum and the intensity convention are checked; any mismatch
    raises ConfigError. Returns the model in eval mode (call `.train()` to finetune).
    """
    folder = _folder(path)
    card = read_card(folder)
    intensity.check_convention(str(card.get("intensity_convention")), f"encoder {folder}")
    weights = folder / str(card.get("weights_file", WEIGHTS_FILE))
    if not weights.is_file():
        raise ConfigError(f"{weights} is missing; copy the whole encoder folder or export it again")
    if _sha256(weights) != card["weights_sha256"]:
        raise ConfigError(f"{weights} does not match the checksum in {CARD_FILE} (corrupt or replaced); export again")
    kwargs = card.get("build_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"build_kwargs in {folder / CARD_FILE} must be an object; export the encoder again")
    model = build_encoder(
        str(card["timm_name"]), in_chans=int(card["in_chans"]), img_size=card.get("img_size"), **kwargs
    )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{weights} is not a readable safetensors file ({exc}); export the encoder again") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "keys or shapes differ"
        raise ConfigError(
            f"{weights} does not fit a '{card['timm_name']}' encoder ({first}); export the encoder again"
        ) from None
    return model.eval()


def _folder(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.suffix in (".json", ".safetensors") else path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
