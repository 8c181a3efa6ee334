"""Typed configs of one finetune run (`FinetuneConfig`) and of a few-label sweep (`SweepConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from radpretrain.errors import ConfigError

CohortKind = Literal["seg2d", "cls2d", "seg3d", "cls3d"]


@dataclass
class OptimConfig:
    """Adam with ReduceLROnPlateau + early stopping on the validation loss, or a cosine schedule."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: Literal["plateau", "cosine"] = "plateau"
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    #: Stop after this many epochs without a better validation loss (0: never stop early).
    early_stop: int = 10
    #: Clip the gradient norm to this value (0: no clipping).
    grad_clip: float = 0.0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 < self.plateau_factor < 1:
            raise ConfigError(f"optim.plateau_factor must be between 0 and 1, got {self.plateau_factor}")
        for name in ("plateau_patience", "early_stop"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class LossConfig:
    """Segmentation: Dice + bce_weight * BCE (MONAI DiceCELoss); classification: cross-entropy."""

    dice_weight: float = 1.0
    bce_weight: float = 1.0

    def validate(self) -> None:
        if self.dice_weight < 0 or self.bce_weight < 0 or self.dice_weight + self.bce_weight == 0:
            raise ConfigError(
                f"loss.dice_weight and loss.bce_weight must be >= 0 and not both 0, "
                f"got {self.dice_weight} and {self.bce_weight}"
            )


@dataclass
class StrategyOptions:
    """Knobs of the transfer strategies that take more than the `name:arg` spec."""

    #: lp-ft: share of the epochs spent on the linear probe (encoder frozen) before finetuning all.
    lp_fraction: float = 0.5
    #: lp-ft: learning-rate factor of the finetune phase (Kumar et al. use a smaller one).
    ft_lr_scale: float = 0.1
    #: partial: number of encoder stages tuned at each end (the middle ones are frozen).
    partial_ends: int = 1

    def validate(self) -> None:
        if not 0 < self.lp_fraction < 1:
            raise ConfigError(f"options.lp_fraction must be between 0 and 1, got {self.lp_fraction}")
        if self.ft_lr_scale <= 0:
            raise ConfigError(f"options.ft_lr_scale must be > 0, got {self.ft_lr_scale}")
        if self.partial_ends < 1:
            raise ConfigError(f"options.partial_ends must be >= 1, got {self.partial_ends}")


@dataclass
class DwpConfig:
    """The deep weight prior: kernel VAEs trained on source models, then variational training of the encoder.

    `init` picks one of two recipes:

    - `paper` (default; Atanov et al. 2018, https://arxiv.org/abs/1810.06943, and its code's `--init_list vae`;
      Kuzina et al. 2019, https://arxiv.org/abs/1906.12281): the prior learns from the kernels of `sources`,
      separate models trained beforehand (required; the run's own encoder weights are refused as a source). The
      target trains from scratch: the convolutions the prior covers start with posterior means sampled from the
      prior, every other weight is He-initialised as in `random`. The transfer is the prior alone, so the
      target encoder only fixes the architecture.
    - `encoder` (radpretrain's recipe before; not the paper's): with no `sources` the prior learns from the run's
      own pretrained encoder, and the posterior means start at that encoder's kernels, the other weights kept.
      This is a pretrained finetune with a learned kernel regulariser: its prior is fitted to the very kernels
      it starts from, so the KL term mostly pulls towards the starting point.
    """

    #: Exported encoder folders, timm / Hugging Face model folders or weights files (the target's
    #: architecture) whose kernels train the prior; required with init=paper, empty with init=encoder: the
    #: run's own encoder.
    sources: list[Path] = field(default_factory=list)
    #: Latent size of each kernel VAE (6 as in Kuzina et al. 2019).
    latent: int = 6
    hidden: int = 64
    vae_steps: int = 2000
    vae_batch: int = 1024
    vae_lr: float = 1e-3
    #: Kernels are grouped by encoder stage (one VAE per stage) or by layer (one VAE per conv).
    groups: Literal["stage", "layer"] = "stage"
    #: The recipe (see above): paper (separate sources, posterior means sampled from the prior, the rest
    #: fresh) or encoder (the run's own encoder as default source, posterior means at its kernels).
    init: Literal["paper", "encoder"] = "paper"
    #: Initial log variance of the Gaussian posterior of every kernel weight.
    init_log_var: float = -10.0
    #: Weight of the KL bound in the loss (1.0 is the ELBO, with the likelihood summed over pixels).
    kl_weight: float = 1.0
    #: Kernels per layer in each step's stochastic (unbiased) KL estimate; 0: all.
    kernel_sample: int = 2048
    #: Seed of the prior's training: the prior depends on the sources only, so every run and sweep cell
    #: with the same sources shares one trained prior.
    seed: int = 0
    #: Folder that keeps trained priors so that sweep cells reuse them (none: keep in memory only).
    cache: Path | None = None

    def validate(self) -> None:
        for name in ("latent", "hidden", "vae_steps", "vae_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dwp.{name} must be >= 1, got {getattr(self, name)}")
        if self.vae_lr <= 0 or self.kl_weight < 0 or self.kernel_sample < 0:
            raise ConfigError("dwp.vae_lr must be > 0, dwp.kl_weight and dwp.kernel_sample >= 0")


@dataclass
class WeakConfig:
    """Weak-label transfer: train on a weak-label cohort first (strategies `weak+NAME`, `weak-only`)."""

    cohort: Path | None = None
    kind: CohortKind | None = None
    structure: str | None = None
    epochs: int = 20

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"weak.epochs must be >= 1, got {self.epochs}")


@dataclass
class FinetuneConfig:
    """One finetune run: a cohort, an encoder, a transfer strategy and the training schedule."""

    #: A labeled cohort folder or CSV (see `radpretrain.data.cohorts.load_cohort`).
    cohort: Path | None = None
    kind: CohortKind | None = None
    label_column: str = "label"
    #: The structure to segment when the cohort table holds several (synthetic masks: lungs, heart, bones).
    structure: str | None = None
    #: An exported encoder folder (encoder.safetensors + encoder.json), existing weights on disk (a timm or
    #: Hugging Face model folder: config.json + model.safetensors or pytorch_model.bin; a bare .safetensors /
    #: .bin / .pt / .pth file, written ARCH@FILE when it does not name its timm architecture), or a timm
    #: encoder name for from-scratch runs (strategy `random`). `NAME=...` names the arm in sweep reports.
    encoder: str = "resnet18"
    #: A from-scratch 3D baseline from `radpretrain.models.baselines3d.MODELS` instead of an encoder.
    model: str | None = None
    #: Transfer strategy spec: random, full, frozen, partial, transfusion:K, meanvar, lp-ft, dwp,
    #: weak+NAME, weak-only.
    strategy: str = "full"
    #: Image side (2D) or volume side (3D) in pixels.
    size: int = 224
    inflate: Literal["centre", "average"] = "centre"
    epochs: int = 50
    batch_size: int = 8
    #: Labeled cases to train on (the label count); none: every case outside the test set.
    n_train: int | None = None
    #: Held-out test share (patient-level) of a single run; a sweep fixes its own test set.
    test_fraction: float = 0.2
    #: Share of the labeled cases (patient-level, at least one when there are two or more) used to
    #: pick the best epoch, reduce the learning rate and stop early.
    val_fraction: float = 0.2
    #: Fewest labeled cases that hold out a validation split for model selection. Below it (a 20 % split of
    #: 29 cases is 6 cases: selecting epochs on them is noise) every labeled case trains for a fixed schedule,
    #: without early stopping, and the last epoch is kept (a plateau scheduler follows the training loss).
    #: 0: always select on a validation split. Runs record the rule as `selection`.
    fixed_schedule_below: int = 30
    augment: bool = True
    seed: int = 0
    cpu: bool = False
    workers: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    options: StrategyOptions = field(default_factory=StrategyOptions)
    dwp: DwpConfig = field(default_factory=DwpConfig)
    weak: WeakConfig = field(default_factory=WeakConfig)
    out: Path = Path("runs/finetune")
    #: Write the finetuned model (and the 2D encoder as an encoder folder) next to the metrics.
    save_model: bool = True
    #: Draw a tqdm bar over epochs.
    progress: bool = True

    def validate(self) -> None:
        for name in ("size", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_train is not None and self.n_train < 1:
            raise ConfigError(f"n_train must be >= 1 (or null for all cases), got {self.n_train}")
        for name in ("test_fraction", "val_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.fixed_schedule_below < 0:
            raise ConfigError(
                f"fixed_schedule_below must be >= 0 (0: always select on a validation split), "
                f"got {self.fixed_schedule_below}"
            )


@dataclass
class SweepConfig:
    """Label count x repeat x strategy x encoder grid over one cohort with one fixed test set."""

    #: The base config of every cell (its n_train, strategy and encoder are set per cell).
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    label_counts: list[int] = field(default_factory=lambda: [5, 10, 20, 50])
    #: Different patient-level subsets drawn from one pool per label count.
    repeats: int = 3
    strategies: list[str] = field(default_factory=lambda: ["random", "full"])
    #: Encoders to compare, each an `encoder` setting: exported folders, timm / Hugging Face model folders or
    #: weights files (`[NAME=][ARCH@]PATH`, e.g. `imagenet=weights/resnet50.a1_in1k`), or timm names; NAME
    #: labels the arm in results and reports. `model:NAME` is a from-scratch 3D baseline
    #: (`radpretrain.models.baselines3d.MODELS`: unet, meshnet, resunet). Empty: `finetune.encoder`.
    encoders: list[str] = field(default_factory=list)
    #: Held-out test set: this many cases (patient-level) if set, else `test_fraction` of the cohort.
    test_count: int | None = None
    test_fraction: float = 0.3
    seed: int = 0
    out: Path = Path("runs/sweep")
    #: Also keep each cell's run folder (metrics, log, config) under out/cells/.
    keep_cells: bool = True

    def validate(self) -> None:
        if not self.label_counts or any(n < 1 for n in self.label_counts):
            raise ConfigError(f"label_counts must be a non-empty list of positive integers, got {self.label_counts}")
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        if not self.strategies:
            raise ConfigError("strategies must name at least one strategy (e.g. [random, full])")
        if self.test_count is not None and self.test_count < 1:
            raise ConfigError(f"test_count must be >= 1 (or null to use test_fraction), got {self.test_count}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be between 0 and 1, got {self.test_fraction}")
