"""Typed configuration of a pretraining run: data, encoder, tasks, optimiser, schedule and monitoring."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from radpretrain.data.positives import Positives, check_mode
from radpretrain.data.transforms import ViewsConfig
from radpretrain.errors import ConfigError


@dataclass
class DataConfig:
    """Where the shards are and how batches are made from them (sizes are per process)."""

    shards: Path | None = None
    image_size: int = 224
    batch_size: int = 64
    workers: int = 4
    shuffle: int = 1000
    #: Write RUN/samples-rank<R>.jsonl: the sample keys (pseudonyms) of every batch each process reads,
    #: to audit the data order and the split of shards between processes (and each sample's partner).
    log_samples: bool = False
    #: Where the second strong view of a two-view task comes from: "augment", the same image augmented
    #: again; "same_study" / "same_patient", another train image of the sample's study / patient where
    #: there is one, else the same image (MICLe, Azizi et al. 2021). See radpretrain.data.positives.
    positives: Positives = "augment"

    def validate(self) -> None:
        for name in ("image_size", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be > 0, got {getattr(self, name)}")
        if self.workers < 0 or self.shuffle < 0:
            raise ConfigError(f"data.workers and data.shuffle must be >= 0, got {self.workers} and {self.shuffle}")
        check_mode(self.positives)


@dataclass
class EncoderConfig:
    """A timm encoder by name (see radpretrain.models.encoders.ENCODERS) plus extra timm arguments."""

    name: str = "resnet18"
    options: dict[str, Any] = field(default_factory=dict)
    #: Start from existing weights instead of a random initialisation: an exported radpretrain encoder, a
    #: timm / Hugging Face model folder or a bare safetensors file (models.weights.init_encoder_from).
    init: Path | None = None


@dataclass
class OptimConfig:
    """AdamW (or LARS for large-batch contrastive runs) with linear warmup then cosine or constant lr."""

    name: Literal["adamw", "lars"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    warmup: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr: float = 0.0
    grad_clip: float = 1.0
    accumulation: int = 1

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.min_lr < 0 or self.grad_clip < 0:
            raise ConfigError("optim.weight_decay, optim.min_lr and optim.grad_clip must be >= 0 (grad_clip 0 = off)")
        if self.warmup < 0:
            raise ConfigError(f"optim.warmup must be >= 0 steps, got {self.warmup}")
        if self.accumulation < 1:
            raise ConfigError(f"optim.accumulation must be >= 1 micro-batches per step, got {self.accumulation}")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers like [0.9, 0.999], got {self.betas}")


@dataclass
class ProbeConfig:
    """Frozen-feature kNN and linear probes of the encoder: the val split's header labels and a labeled cohort.

    Header labels a task of the run trains on (the `metadata` task's labels) measure that training, not
    transfer; `cohort` is the fair comparison: a labeled classification cohort (what `radpretrain finetune`
    accepts) that no pretext task sees, scored by patient-level cross-validation (AUROC, balanced accuracy).
    """

    labels: list[str] = field(default_factory=lambda: ["body_part", "age_bucket"])
    train_samples: int = 2000
    val_samples: int = 1000
    k: int = 20
    batch_size: int = 64
    #: A labeled 2D classification cohort (folder or CSV) for the downstream probe; None: header labels only.
    cohort: Path | None = None
    #: Patient-level cross-validation folds of the cohort probe (fewer when the cohort has fewer patients).
    folds: int = 5

    def validate(self) -> None:
        if self.train_samples < 1 or self.val_samples < 1 or self.k < 1 or self.batch_size < 1:
            raise ConfigError("probe.train_samples, probe.val_samples, probe.k and probe.batch_size must be >= 1")
        if self.folds < 2:
            raise ConfigError(f"probe.folds must be >= 2 (patient-level cross-validation), got {self.folds}")
        from radpretrain.registry import did_you_mean
        from radpretrain.shards.format import LABEL_NAMES

        for label in self.labels:  # checked now, not after training when the first probe runs
            if label not in LABEL_NAMES:
                raise ConfigError(
                    f"unknown probe label '{label}' in probe.labels.{did_you_mean(label, LABEL_NAMES)} "
                    f"Known: {', '.join(LABEL_NAMES)}"
                )


@dataclass
class PretrainConfig:
    """One pretraining run; `radpretrain pretrain CONFIG key=value ...` builds it, RUN/config.yaml keeps it."""

    out: Path = Path("runs/pretrain")
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    tasks: dict[str, float] = field(default_factory=lambda: {"simclr": 1.0})
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    augment: ViewsConfig = field(default_factory=ViewsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: Literal["no", "bf16", "fp16"] = "no"
    cpu: bool = False
    #: BatchNorm statistics over the global batch (SyncBatchNorm); null: on when there is more than one
    #: process and the model has BatchNorm. Not possible on CPU (gloo): the run says so and keeps them per process.
    sync_bn: bool | None = None
    steps: int = 1000
    #: End this session after this many steps (checkpointed; --resume continues), e.g. to fit a queue's
    #: time limit; 0 runs to `steps`. The schedule still spans `steps`.
    stop_after: int = 0
    checkpoint_every: int = 500
    probe_every: int = 0
    log_every: int = 10
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    seed: int = 0
    resume: bool = False

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.checkpoint_every < 0 or self.probe_every < 0 or self.stop_after < 0 or self.log_every < 1:
            raise ConfigError(
                "checkpoint_every, probe_every and stop_after must be >= 0 (0 = only at the end), log_every >= 1"
            )
        if not self.tasks:
            raise ConfigError("tasks is empty; name at least one pretext task, e.g. tasks={simclr: 1.0}")
        for name, weight in self.tasks.items():
            if not (math.isfinite(weight) and weight > 0):
                raise ConfigError(f"tasks.{name} weight must be a positive number, got {weight}")
        unused = sorted(set(self.task_options) - set(self.tasks))
        if unused:
            raise ConfigError(
                f"task_options given for {', '.join(unused)} which is not in tasks ({', '.join(sorted(self.tasks))}); "
                "add it to tasks or remove its options"
            )


#: Keys whose change makes a checkpoint meaningless for a run; `resume` refuses to mix them (`encoder` is
#: compared whole: name, options and init). `data.positives` changes what the run learns to match.
RESUME_FIXED = ("encoder", "tasks", "task_options", "data.image_size", "data.positives", "optim.name")
