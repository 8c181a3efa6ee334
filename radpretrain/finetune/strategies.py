"""Transfer strategies: how a (pretrained) encoder's weights enter a model and which of them train when.

- [0] Transfusion: Understanding Transfer Learning for Medical Imaging, Raghu, Zhang, Kleinberg, Bengio
  2019, https://arxiv.org/abs/1902.07208 (partial transfer of the first k stages, Mean Var init)
- [1] Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution, Kumar et al.
  2022, https://arxiv.org/abs/2202.10054 (LP-FT)
- [2] The Deep Weight Prior, Atanov et al. 2018, https://arxiv.org/abs/1810.06943 (see `dwp.py`)
- [3] Delving Deep into Rectifiers, He et al. 2015, https://arxiv.org/abs/1502.01852 (He init)

A strategy acts in up to six places, all called by the finetune build and loop, which never name a
strategy: `prepare` gathers what the strategy needs besides the encoder (the DWP's source encoders),
`init_encoder` changes the 2D encoder's weights before the model is built around it, `wrap` changes the
built model, `phases` says which parameters train in which share of the epochs, `regulariser` adds a term
to the loss, and `exportable` turns the finetuned encoder back into plain timm layers for export.
Specs are `name` or `name:arg` (`transfusion:2`); `weak+NAME` first trains NAME's model on a weak-label
cohort and then finetunes it on the labeled one, `weak-only` trains on the weak-label cohort alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.finetune.config import DwpConfig, StrategyOptions
from radpretrain.registry import Registry

#: The model's attribute that holds the encoder (SegmentationModel and Classifier both expose it).
ENCODER = "encoder"


@dataclass(frozen=True)
class Phase:
    """A share of the epochs in which parameters under `frozen` (model-level name prefixes) stay fixed."""

    name: str
    share: float
    frozen: tuple[str, ...] = ()
    lr_scale: float = 1.0


@dataclass
class TransferContext:
    """What strategies need to know beyond the model: stages, options and the DWP's source encoders."""

    #: Parameter-name prefixes of each encoder stage, input side first (`encoders.encoder_stages`).
    stages: list[list[str]]
    options: StrategyOptions = field(default_factory=StrategyOptions)
    dwp: DwpConfig = field(default_factory=DwpConfig)
    #: Source encoders (2D) of the deep weight prior.
    sources: list[nn.Module] = field(default_factory=list)
    seed: int = 0
    device: str | torch.device = "cpu"


@dataclass(frozen=True)
class EncoderOrigin:
    """Where the target encoder came from, for a strategy that gathers more encoders like it."""

    #: The target's timm architecture name.
    name: str
    #: The target's card when it came from an exported folder (None: a timm name or a timm checkpoint).
    card: dict[str, Any] | None
    #: Loads another encoder of the target's architecture from weights on disk (an exported folder with the
    #: checks the target passed, a timm / Hugging Face folder or a bare file).
    load: Callable[[str | Path], nn.Module]
    #: Whether the target came with weights (a path) rather than as a bare timm architecture.
    pretrained: bool = True


@dataclass(frozen=True)
class StrategySpec:
    """A parsed strategy spec: the registered name, its argument and the weak-label stage."""

    name: str
    arg: str | None = None
    weak: Literal["none", "then", "only"] = "none"

    def __str__(self) -> str:
        base = self.name if self.arg is None else f"{self.name}:{self.arg}"
        return {"none": base, "then": f"weak+{base}", "only": "weak-only"}[self.weak]


class Strategy:
    """Base class: keep the weights, train everything, no regulariser (that is `full`)."""

    #: Whether the strategy reads the encoder's transferred weights (False: any timm name will do).
    needs_pretrained: ClassVar[bool] = True
    #: Whether the strategy takes a `:arg`.
    takes_arg: ClassVar[bool] = False

    def __init__(self, arg: str | None = None) -> None:
        if arg is not None and not self.takes_arg:
            raise ConfigError(f"strategy '{type(self).__name__.lower()}' takes no ':{arg}' argument; remove it")

    def prepare(self, encoder: nn.Module, ctx: TransferContext, origin: EncoderOrigin) -> None:
        """Gather what the strategy needs besides the 2D encoder into `ctx`, before `init_encoder` (default:
        nothing)."""

    def init_encoder(self, encoder: nn.Module, ctx: TransferContext) -> None:
        """Change the 2D encoder's weights in place before the model is built (default: keep them)."""

    def wrap(self, model: nn.Module, ctx: TransferContext) -> None:
        """Change the built model in place (default: nothing)."""

    def phases(self, ctx: TransferContext) -> list[Phase]:
        return [Phase("train", 1.0)]

    def regulariser(self, model: nn.Module, loss_values: int) -> torch.Tensor | None:
        """A term to add to the task loss (default: none). The task loss averages over `loss_values` values
        per pass over the training set (cases, times pixels or voxels for masks): a term defined over the
        whole training set divides by it."""
        return None

    def exportable(self, encoder: nn.Module) -> nn.Module:
        """The finetuned 2D encoder as plain timm layers, for export (default: as it is)."""
        return encoder


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def parse_spec(spec: str) -> StrategySpec:
    """`full`, `transfusion:2`, `weak+full`, `weak-only` -> StrategySpec (names checked in the registry)."""
    text = spec.strip()
    if text == "weak-only":
        return StrategySpec("random", None, "only")
    weak: Literal["none", "then"] = "none"
    if text.startswith("weak+"):
        weak, text = "then", text[len("weak+") :]
    name, sep, arg = text.partition(":")
    STRATEGIES.get(name)  # raises the "did you mean" error
    if sep and not arg:
        raise ConfigError(f"strategy spec '{spec}' has an empty argument after ':' (e.g. transfusion:2)")
    return StrategySpec(name, arg if sep else None, weak)


def build_strategy(spec: str | StrategySpec) -> Strategy:
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    return STRATEGIES.get(parsed.name)(parsed.arg)


# --------------------------------------------------------------------------------------------------------------
# Weight helpers.
# --------------------------------------------------------------------------------------------------------------


def under(name: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    """Whether a parameter/module name lies under one of the prefixes (`a.b` is under `a`, `a.bc` is not)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@torch.no_grad()
def he_init_(module: nn.Module, prefixes: list[str] | None = None) -> int:
    """Re-initialise (parts of) a module: He-normal (fan_out, ReLU) convolutions and linears, zero biases,
    unit norms with fresh running statistics, and N(0, 0.02^2) for loose parameters such as ViT position
    embeddings. Returns the number of parameter tensors re-initialised."""
    done: set[int] = set()
    for name, m in module.named_modules():
        if prefixes is not None and not under(name, prefixes):
            continue
        if isinstance(m, _CONVS) or (
            hasattr(m, "weight") and isinstance(m.weight, nn.Parameter) and m.weight.dim() > 1
        ):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            done.add(id(m.weight))
            if getattr(m, "bias", None) is not None and isinstance(m.bias, nn.Parameter):
                nn.init.zeros_(m.bias)
                done.add(id(m.bias))
        elif isinstance(m, _NORMS):
            m.reset_parameters()  # batch norms also reset their running statistics
            done.update(id(p) for p in m.parameters(recurse=False))
    for name, param in module.named_parameters():
        if id(param) in done or (prefixes is not None and not under(name, prefixes)):
            continue
        nn.init.trunc_normal_(param, std=0.02)
        done.add(id(param))
    return len(done)


def stage_prefixes(stages: list[list[str]], indices: range | list[int]) -> list[str]:
    return [prefix for i in indices for prefix in stages[i]]


def _model_level(prefixes: list[str]) -> tuple[str, ...]:
    return tuple(f"{ENCODER}.{p}" for p in prefixes)


# --------------------------------------------------------------------------------------------------------------
# The strategies.
# --------------------------------------------------------------------------------------------------------------


@STRATEGIES.register("random")
class Random(Strategy):
    """No transfer: the encoder's architecture with He-initialised weights [3], everything trained."""

    needs_pretrained = False

    def init_encoder(self, encoder: nn.Module, ctx: TransferContext) -> None:
        he_init_(encoder)


@STRATEGIES.register("full")
class Full(Strategy):
    """Transfer every encoder weight and finetune everything."""


@STRATEGIES.register("frozen")
class Frozen(Strategy):
    """Transfer the encoder and keep it fixed (its batch-norm statistics too); train the decoder/head."""

    def phases(self, ctx: TransferContext) -> list[Phase]:
        return [Phase("train", 1.0, frozen=(ENCODER,))]


@STRATEGIES.register("partial")
class Partial(Strategy):
    """Transfer everything, freeze the middle stages and tune the first and last `options.partial_ends`."""

    def phases(self, ctx: TransferContext) -> list[Phase]:
        ends = ctx.options.partial_ends
        if len(ctx.stages) <= 2 * ends:
            raise ConfigError(
                f"strategy partial tunes {ends} stage(s) at each end but the encoder has only {len(ctx.stages)} "
                "stages, so nothing would be frozen; lower options.partial_ends or use full"
            )
        middle = stage_prefixes(ctx.stages, range(ends, len(ctx.stages) - ends))
        return [Phase("train", 1.0, frozen=_model_level(middle))]


@STRATEGIES.register("transfusion")
class Transfusion(Strategy):
    """`transfusion:k`: transfer the first k stages (input side), He-initialise the rest, train all [0]."""

    takes_arg = True

    def __init__(self, arg: str | None = None) -> None:
        super().__init__(arg)
        try:
            self.k = int(arg) if arg is not None else -1
        except ValueError:
            self.k = -1
        if self.k < 0:
            raise ConfigError(
                f"strategy transfusion needs the number of stages to transfer, e.g. transfusion:2 (got {arg!r})"
            )

    def init_encoder(self, encoder: nn.Module, ctx: TransferContext) -> None:
        if self.k > len(ctx.stages):
            raise ConfigError(
                f"transfusion:{self.k} asks for {self.k} stages but the encoder has {len(ctx.stages)}; "
                f"use 0..{len(ctx.stages)}"
            )
        rest = stage_prefixes(ctx.stages, range(self.k, len(ctx.stages)))
        if rest:
            he_init_(encoder, rest)


@STRATEGIES.register("meanvar")
class MeanVar(Strategy):
    """The Transfusion weight-scaling control [0]: every weight tensor drawn i.i.d. from N(mean, var) of
    its pretrained values, so only the per-layer scale is transferred; norm statistics start fresh."""

    @torch.no_grad()
    def init_encoder(self, encoder: nn.Module, ctx: TransferContext) -> None:
        generator = torch.Generator().manual_seed(ctx.seed)
        for param in encoder.parameters():
            if param.numel() < 2:
                continue
            mean, std = param.float().mean(), param.float().std()
            draw = torch.randn(param.shape, generator=generator) * std + mean
            param.copy_(draw.to(param.dtype))
        for m in encoder.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.reset_running_stats()


@STRATEGIES.register("lp-ft")
class LinearProbeFinetune(Strategy):
    """LP-FT [1]: train the head/decoder on the frozen encoder, then finetune everything at a lower rate."""

    def phases(self, ctx: TransferContext) -> list[Phase]:
        share = ctx.options.lp_fraction
        return [
            Phase("probe", share, frozen=(ENCODER,)),
            Phase("finetune", 1.0 - share, lr_scale=ctx.options.ft_lr_scale),
        ]


@STRATEGIES.register("dwp")
class DeepWeightPrior(Strategy):
    """The deep weight prior [2]: variational training of the encoder's convolutions with kernel VAEs, trained on
    the source encoders' kernels, as an implicit prior (see `radpretrain.finetune.dwp`; `dwp.init` picks the
    paper's recipe or the pretrained-encoder one, `DwpConfig` says how they differ)."""

    def __init__(self, arg: str | None = None) -> None:
        super().__init__(arg)
        self.layers: dict[str, str] = {}
        self.prior: nn.Module | None = None
        self.kernel_sample = 0
        self.kl_weight = 1.0

    def prepare(self, encoder: nn.Module, ctx: TransferContext, origin: EncoderOrigin) -> None:
        """The source encoders: `dwp.sources`; with `dwp.init=encoder` and no sources, the pretrained target
        itself (a copy, before any change). `dwp.init=paper` refuses the target's own weights as a source."""
        if not ctx.dwp.sources:
            if ctx.dwp.init == "paper":
                raise ConfigError(
                    "strategy dwp (dwp.init=paper) learns its prior from separate source models: set "
                    "dwp.sources=[...] (exported encoders or timm checkpoints of the target's architecture), or "
                    "dwp.init=encoder to learn it from this run's own encoder"
                )
            if not origin.pretrained:
                raise ConfigError(
                    "strategy dwp needs source kernels: set dwp.sources or give a pretrained encoder folder"
                )
            ctx.sources = [copy.deepcopy(encoder)]
            return
        sources = [origin.load(path) for path in ctx.dwp.sources]
        if ctx.dwp.init == "paper" and origin.pretrained:
            own = encoder.state_dict()
            for path, source in zip(ctx.dwp.sources, sources, strict=True):
                theirs = source.state_dict()
                if all(k in theirs and torch.equal(v, theirs[k]) for k, v in own.items() if v.is_floating_point()):
                    raise ConfigError(
                        f"dwp source {path} holds this run's own encoder weights; dwp.init=paper learns the prior "
                        "from separate source models (give others, or set dwp.init=encoder)"
                    )
        ctx.sources = sources

    def init_encoder(self, encoder: nn.Module, ctx: TransferContext) -> None:
        """dwp.init=paper trains the target from scratch, as Atanov et al.'s code does: every weight the prior does
        not cover is freshly initialised here, and `wrap` draws the covered kernels from the prior."""
        if ctx.dwp.init == "paper":
            he_init_(encoder)

    def wrap(self, model: nn.Module, ctx: TransferContext) -> None:
        from radpretrain.finetune import dwp

        if not ctx.sources:
            raise ConfigError("strategy dwp needs source encoders (dwp.sources, or a pretrained encoder)")
        kernels = dwp.collect_kernels(ctx.sources, ctx.stages, ctx.dwp.groups)
        prior = dwp.load_or_train_prior(kernels, ctx.dwp, seed=ctx.dwp.seed)
        generator = torch.Generator().manual_seed(ctx.seed)
        encoder = getattr(model, ENCODER)
        self.layers = dwp.make_variational(encoder, prior, ctx.stages, ctx.dwp, generator=generator)
        self.prior = prior.to(ctx.device)
        self.kernel_sample = ctx.dwp.kernel_sample
        self.kl_weight = ctx.dwp.kl_weight

    def regulariser(self, model: nn.Module, loss_values: int) -> torch.Tensor | None:
        """The KL bound (nats over the whole training set), weighted by `dwp.kl_weight` per loss value."""
        from radpretrain.finetune import dwp

        assert isinstance(self.prior, dwp.KernelPrior), "wrap() must run before regulariser()"
        kl = dwp.kl_bound(getattr(model, ENCODER), self.layers, self.prior, kernel_sample=self.kernel_sample)
        return kl * (self.kl_weight / loss_values)

    def exportable(self, encoder: nn.Module) -> nn.Module:
        """A copy whose variational convolutions are plain ones holding the posterior means."""
        from radpretrain.finetune import dwp

        return dwp.to_deterministic(encoder)
