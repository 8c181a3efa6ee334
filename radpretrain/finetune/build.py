"""The model a finetune trains: the encoder (exported folder or timm name) shaped by a strategy, with its head."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from radpretrain import intensity
from radpretrain.errors import CohortError, ConfigError
from radpretrain.finetune.config import FinetuneConfig
from radpretrain.finetune.strategies import (
    EncoderOrigin,
    Strategy,
    StrategySpec,
    TransferContext,
    build_strategy,
    parse_spec,
)

if TYPE_CHECKING:
    from radpretrain.data.cohorts import Cohort


@dataclass
class Built:
    """A model ready to train, with the strategy that shaped it and how it was made."""

    model: nn.Module
    strategy: Strategy
    spec: StrategySpec
    ctx: TransferContext
    #: The encoder's card when it came from an exported folder (None: built from a timm name or a baseline).
    card: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# What the cohort asks for.
# --------------------------------------------------------------------------------------------------------------


def task_of(cohort: Cohort) -> str:
    """ "seg" or "cls"."""
    return str(cohort.task)


def num_classes(cohort: Cohort) -> int:
    """Classes of a classification cohort (its `classes`, at least two); regression targets are refused."""
    if any(isinstance(case.target, float) for case in cohort.cases):
        raise CohortError("the cohort's labels are non-integer numbers (regression); finetune classifies or segments")
    if len(cohort.classes) < 2:
        raise CohortError(
            f"a classification cohort needs at least two classes, found {len(cohort.classes)} "
            f"({', '.join(cohort.classes) or 'none'}); check the label column"
        )
    return len(cohort.classes)


def outputs_of(cohort: Cohort) -> int:
    return 1 if task_of(cohort) == "seg" else num_classes(cohort)


# --------------------------------------------------------------------------------------------------------------
# The encoder.
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderArm:
    """One `encoder` setting: `[NAME=][ARCH@]PATH` (existing weights) or a timm name (built at random).

    PATH is an exported radpretrain encoder folder, a timm / Hugging Face model folder or a bare weights file
    (`radpretrain.models.weights`). NAME labels the arm in sweep results and reports (default: the folder or
    file name); ARCH gives the timm architecture of a file that does not name one.
    """

    text: str
    #: The arm's label in results: NAME, else the text as given (reports show its last path part).
    label: str
    #: The path of the weights, or the timm name.
    source: str
    #: The timm architecture given as ARCH@ (None: from the weights, or `source` for a timm name).
    architecture: str | None = None

    @property
    def is_path(self) -> bool:
        return is_encoder_folder(self.source)


_WORD = re.compile(r"^[A-Za-z0-9_.+-]+$")


def parse_encoder(value: str) -> EncoderArm:
    """`imagenet=resnet50@/w/r50.safetensors` -> EncoderArm(label imagenet, arch resnet50, source the file);
    `scratch=resnet50` labels a timm name. An existing path is taken whole even when it holds `=` or `@`."""
    text = value.strip()
    if Path(text).exists():
        return EncoderArm(text, text, text)
    label: str | None = None
    rest = text
    name, sep, after = rest.partition("=")
    if sep and _WORD.match(name) and after:
        label, rest = name, after
    architecture: str | None = None
    arch, sep, after = rest.partition("@")
    if sep and _WORD.match(arch) and after and is_encoder_folder(after):
        architecture, rest = arch, after
    return EncoderArm(text, label if label is not None else text, rest, architecture)


def is_encoder_folder(value: str) -> bool:
    """Whether `encoder` names existing weights (a path) rather than a timm architecture name."""
    path = Path(value)
    return path.is_dir() or path.suffix in WEIGHT_SUFFIXES or "/" in value or "\\" in value


#: File suffixes `encoder` takes as weights rather than a timm name.
WEIGHT_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth")


def load_checked_encoder(path: str | Path, cfg: FinetuneConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Load an exported encoder, refusing one whose intensity convention, channels or input size do not fit."""
    from radpretrain.models.encoders import build_encoder, read_card
    from radpretrain.models.weights import init_encoder_from

    card = read_card(path)
    intensity.check_convention(str(card.get("intensity_convention")), f"encoder {path}")
    if int(card["in_chans"]) != 1:
        raise ConfigError(
            f"encoder {path} takes {card['in_chans']} input channels but cohort images have 1; "
            "export an encoder built with in_chans=1"
        )
    fixed = fixed_input_size(card)
    if fixed is not None and fixed != cfg.size:
        raise ConfigError(
            f"encoder {path} has a fixed input size of {fixed} px but size={cfg.size}; set size={fixed} "
            "(or export an encoder built for this size)"
        )
    kwargs = card.get("build_kwargs") or {}
    encoder = build_encoder(str(card["timm_name"]), in_chans=1, img_size=card.get("img_size"), **kwargs)
    init_encoder_from(encoder, path)
    return encoder.train(), card


#: timm constructor arguments a model folder may record that radpretrain sets itself.
_FIXED_ARGS = ("pretrained", "num_classes", "features_only", "pretrained_cfg_overlay", "in_chans", "img_size")


def load_weights_encoder(arm: EncoderArm, cfg: FinetuneConfig, dims: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    """Build the architecture of a timm / Hugging Face folder or bare weights file for one-channel inputs of
    `cfg.size` and load the weights into it (stems folded, heads dropped); returns (encoder, what was loaded)."""
    from radpretrain.models.encoders import build_encoder
    from radpretrain.models.weights import base_architecture, describe_weights, init_encoder_from

    weights = describe_weights(arm.source)
    architecture = arm.architecture or weights.architecture
    if architecture is None:
        raise ConfigError(
            f"{arm.source} does not say which architecture its weights are for; write the encoder as "
            f"ARCH@{arm.source} (e.g. resnet50@{arm.source}), optionally NAME=ARCH@PATH"
        )
    kwargs = {k: v for k, v in weights.model_args.items() if k not in _FIXED_ARGS}
    encoder = build_encoder(base_architecture(architecture), img_size=cfg.size if dims == 2 else None, **kwargs)
    info = init_encoder_from(encoder, weights.path)
    return encoder.train(), info


def load_arm(
    arm: EncoderArm, cfg: FinetuneConfig, dims: int = 2
) -> tuple[nn.Module, dict[str, Any] | None, dict[str, Any] | None]:
    """(encoder, card of an exported folder, what `init_encoder_from` loaded) for any path `encoder` setting."""
    from radpretrain.models.encoders import read_card
    from radpretrain.models.weights import describe_weights

    if not Path(arm.source).exists() and Path(arm.source).suffix not in WEIGHT_SUFFIXES:
        read_card(arm.source)  # a missing folder: say what it should hold, as for an export
    weights = describe_weights(arm.source)
    if weights.kind == "radpretrain" and arm.architecture is None:
        encoder, card = load_checked_encoder(weights.path, cfg)
        return encoder, card, {"path": str(weights.path), "format": weights.kind, "architecture": card["timm_name"]}
    encoder, info = load_weights_encoder(arm, cfg, dims)
    return encoder, None, info


def fixed_input_size(card: dict[str, Any]) -> int | None:
    """The input side an exported encoder requires (ViTs: their position embeddings), None for CNNs."""
    import timm

    pretrained_cfg = timm.models.get_pretrained_cfg(str(card["timm_name"]))
    size = card.get("img_size")
    if pretrained_cfg is None or not pretrained_cfg.fixed_input_size or size is None:
        return None
    return int(size)


# --------------------------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------------------------


def build_model(cfg: FinetuneConfig, cohort: Cohort, device: str | torch.device = "cpu") -> Built:
    """Encoder (exported folder or timm name) -> strategy prepare and init -> (inflation) -> head -> strategy wrap."""
    from radpretrain.models.encoders import build_encoder, encoder_stages
    from radpretrain.models.weights import encoder_architecture

    spec = parse_spec(cfg.strategy)
    strategy = build_strategy(spec)
    outputs = outputs_of(cohort)
    dims = int(cohort.spatial_dims)

    if cfg.model is not None:
        return _build_baseline(cfg, cohort, spec, strategy, outputs, dims)

    card: dict[str, Any] | None = None
    loaded: dict[str, Any] | None = None
    arm = parse_encoder(cfg.encoder)
    if arm.is_path:
        encoder, card, loaded = load_arm(arm, cfg, dims)
    else:
        if type(strategy).needs_pretrained:
            raise ConfigError(
                f"strategy '{spec}' transfers pretrained weights but encoder '{cfg.encoder}' is not an exported "
                "encoder folder; give encoder=<folder written by radpretrain export> or use strategy random"
            )
        encoder = build_encoder(arm.source, img_size=cfg.size if dims == 2 else None)

    ctx = TransferContext(
        stages=encoder_stages(encoder), options=cfg.options, dwp=cfg.dwp, seed=cfg.seed, device=device
    )
    origin = EncoderOrigin(
        name=encoder_architecture(encoder),
        card=card,
        load=lambda path: load_source(path, encoder, cfg),
        pretrained=arm.is_path,
    )
    strategy.prepare(encoder, ctx, origin)
    strategy.init_encoder(encoder, ctx)
    if dims == 3:
        from radpretrain.models.inflate import inflate

        encoder = inflate(encoder, cfg.inflate)
    model = _with_head(encoder, cohort, outputs, dims)
    strategy.wrap(model, ctx)
    return Built(model, strategy, spec, ctx, card, {"init": loaded} if loaded is not None else {})


def load_source(path: str | Path, like: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Another encoder of `like`'s architecture (and build options) with the weights at `path` (any kind
    `init_encoder_from` reads), for a strategy that gathers source models (the DWP); weights made for another
    architecture are refused in one line naming both."""
    from radpretrain.models.encoders import build_encoder
    from radpretrain.models.weights import base_architecture, describe_weights, encoder_architecture, init_encoder_from

    weights = describe_weights(path)
    target = encoder_architecture(like)
    if weights.kind == "radpretrain":
        if weights.architecture is not None and base_architecture(weights.architecture) != target:
            raise ConfigError(
                f"weights in {weights.path} are for '{weights.architecture}', the encoder is '{target}'; sources "
                "must share the target's architecture (the prior groups kernels by stage)"
            )
        return load_checked_encoder(weights.path, cfg)[0]
    build = dict(getattr(like, "radpretrain_build", None) or {})
    source = build_encoder(
        str(build.get("name", target)),
        in_chans=int(build.get("in_chans", 1)),
        img_size=build.get("img_size"),
        **(build.get("kwargs") or {}),
    )
    init_encoder_from(source, weights.path)
    return source.train()


def _with_head(encoder: nn.Module, cohort: Cohort, outputs: int, dims: int) -> nn.Module:
    if task_of(cohort) == "seg":
        from radpretrain.models.unet import SegmentationModel

        return SegmentationModel(encoder, outputs, spatial_dims=dims)
    from radpretrain.models.heads import Classifier

    return Classifier(encoder, outputs)


def _build_baseline(
    cfg: FinetuneConfig, cohort: Cohort, spec: StrategySpec, strategy: Strategy, outputs: int, dims: int
) -> Built:
    from radpretrain.models.baselines3d import MODELS

    assert cfg.model is not None

    if type(strategy).needs_pretrained:
        raise ConfigError(
            f"model={cfg.model} is a from-scratch baseline without a pretrained encoder; use strategy random "
            f"(or weak+random / weak-only), not '{spec}'"
        )
    if task_of(cohort) != "seg":
        raise ConfigError(f"model={cfg.model} segments; cohort kind '{cohort.kind}' needs an encoder and a classifier")
    model = MODELS.get(cfg.model)(spatial_dims=dims, in_channels=1, out_channels=outputs)
    return Built(model, strategy, spec, TransferContext(stages=[]), None)
