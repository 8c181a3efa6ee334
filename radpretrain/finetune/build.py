"""The model a finetune trains: the encoder (exported folder or timm name) shaped by a strategy, with its head."""

from __future__ import annotations

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


def is_encoder_folder(value: str) -> bool:
    """Whether `encoder` names an exported encoder (a path) rather than a timm architecture name."""
    path = Path(value)
    return path.is_dir() or path.suffix in (".json", ".safetensors") or "/" in value or "\\" in value


def load_checked_encoder(path: str | Path, cfg: FinetuneConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Load an exported encoder, refusing one whose intensity convention, channels or input size do not fit."""
    from radpretrain.models.encoders import load_encoder, read_card

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
    return load_encoder(path).train(), card


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

    spec = parse_spec(cfg.strategy)
    strategy = build_strategy(spec)
    outputs = outputs_of(cohort)
    dims = int(cohort.spatial_dims)

    if cfg.model is not None:
        return _build_baseline(cfg, cohort, spec, strategy, outputs, dims)

    card: dict[str, Any] | None = None
    if is_encoder_folder(cfg.encoder):
        encoder, card = load_checked_encoder(cfg.encoder, cfg)
    else:
        if type(strategy).needs_pretrained:
            raise ConfigError(
                f"strategy '{spec}' transfers pretrained weights but encoder '{cfg.encoder}' is not an exported "
                "encoder folder; give encoder=<folder written by radpretrain export> or use strategy random"
            )
        encoder = build_encoder(cfg.encoder, img_size=cfg.size if dims == 2 else None)

    ctx = TransferContext(
        stages=encoder_stages(encoder), options=cfg.options, dwp=cfg.dwp, seed=cfg.seed, device=device
    )
    origin = EncoderOrigin(
        name=str(card["timm_name"]) if card is not None else cfg.encoder,
        card=card,
        load=lambda path: load_checked_encoder(path, cfg)[0],
    )
    strategy.prepare(encoder, ctx, origin)
    strategy.init_encoder(encoder, ctx)
    if dims == 3:
        from radpretrain.models.inflate import inflate

        encoder = inflate(encoder, cfg.inflate)
    model = _with_head(encoder, cohort, outputs, dims)
    strategy.wrap(model, ctx)
    return Built(model, strategy, spec, ctx, card)


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
