"""Metadata labels as supervision: predict body part and age bucket (optionally sex, view) from the image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.pretrain.tasks.base import Task, register_task
from radpretrain.shards.format import LABEL_NAMES

MISSING = -1
BALANCE = ("none", "inverse_sqrt", "inverse", "focal")


def class_weights(counts: torch.Tensor, balance: str) -> torch.Tensor | None:
    """Per-class loss weights from class counts, normalised so that the average sample weight is 1.

    "inverse" weighs classes by 1/n (balanced), "inverse_sqrt" by 1/sqrt(n) (milder, often better with
    rare classes of very few images); "none" and "focal" use no weights.
    """
    if balance not in ("inverse", "inverse_sqrt"):
        return None
    counts = counts.float().clamp_min(1.0)
    raw = counts.reciprocal() if balance == "inverse" else counts.rsqrt()
    return raw * counts.sum() / (raw * counts).sum()


def focal_cross_entropy(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Softmax focal loss per sample, (B, K) logits and (B,) targets without missing entries.

    - [0] Focal Loss for Dense Object Detection, 2017, https://arxiv.org/abs/1708.02002
    """
    log_p = nn.functional.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    return -((1 - log_p.exp()) ** gamma) * log_p


@register_task("metadata")
class Metadata(Task):
    """Linear (or MLP) heads on the pooled features predict header labels; missing labels are ignored.

    Options:
        labels: Which of body_part, age_bucket, sex, view to predict.
        view: Which view the heads see ("plain", or "view0" to share the contrastive view's crop).
        balance: Class imbalance handling: "inverse_sqrt" (default), "inverse", "focal" or "none".
        focal_gamma: Focusing exponent of the focal loss.
        class_counts: {label: {class: n}} from the manifest; without it the weights come from the
            label counts seen so far in training (kept in a buffer, so they resume with the checkpoint).
        hidden_dim: 0 for linear heads, else the width of a one-hidden-layer MLP.
        label_smoothing: Cross-entropy label smoothing.

    Logs, per label: "<label>/loss", and "<label>/acc" when the batch has labelled images.
    """

    views = ("plain",)
    defaults: ClassVar[dict[str, Any]] = {
        "labels": ["body_part", "age_bucket"],
        "view": "plain",
        "balance": "inverse_sqrt",
        "focal_gamma": 2.0,
        "class_counts": None,
        "hidden_dim": 0,
        "label_smoothing": 0.0,
    }

    def __init__(
        self, encoder: nn.Module, num_features: int, options: Mapping[str, Any], vocab: Mapping[str, list[str]]
    ) -> None:
        super().__init__(encoder, num_features, options, vocab)
        opts = self.options
        if opts["view"] not in ("plain", "view0", "view1"):
            raise ConfigError(f"task_options.metadata.view must be plain, view0 or view1, got {opts['view']!r}")
        if opts["balance"] not in BALANCE:
            raise ConfigError(
                f"task_options.metadata.balance must be one of {', '.join(BALANCE)}, got {opts['balance']!r}"
            )
        if not 0.0 <= opts["label_smoothing"] < 1.0 or opts["focal_gamma"] < 0 or opts["hidden_dim"] < 0:
            raise ConfigError("task_options.metadata: label_smoothing in [0, 1), focal_gamma >= 0, hidden_dim >= 0")
        labels: Sequence[str] = opts["labels"]
        if not labels:
            raise ConfigError(f"task_options.metadata.labels is empty; choose from {', '.join(LABEL_NAMES)}")
        for label in labels:
            if label not in LABEL_NAMES:
                raise ConfigError(
                    f"task_options.metadata.labels: unknown label {label!r}; choose from {', '.join(LABEL_NAMES)}"
                )
            if len(self.vocab.get(label, ())) < 2:
                raise ConfigError(
                    f"metadata label '{label}' needs at least two classes in the shards' vocab, got "
                    f"{self.vocab.get(label, [])}; drop it from task_options.metadata.labels"
                )
        self.labels = list(dict.fromkeys(labels))
        self.views = (opts["view"],)
        hidden = opts["hidden_dim"]

        def head(classes: int) -> nn.Module:
            if not hidden:
                return nn.Linear(num_features, classes)
            return nn.Sequential(nn.Linear(num_features, hidden), nn.GELU(), nn.Linear(hidden, classes))

        self.heads = nn.ModuleDict({label: head(len(self.vocab[label])) for label in self.labels})
        given = opts["class_counts"] or {}
        self.fixed_counts = bool(given)
        for label in self.labels:
            counts = torch.zeros(len(self.vocab[label]))
            if given:
                per_class = given.get(label)
                if not isinstance(per_class, Mapping):
                    raise ConfigError(f"task_options.metadata.class_counts.{label} must map class names to counts")
                for index, name in enumerate(self.vocab[label]):
                    counts[index] = float(per_class.get(name, 0))
            # Persistent: the running counts resume with a checkpoint, so weights do not jump.
            self.register_buffer(f"counts_{label}", counts)

    def trained_labels(self) -> tuple[str, ...]:
        return tuple(self.options["labels"])

    def forward(self, encoder: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features = encoder(batch[self.views[0]])
        out: dict[str, torch.Tensor] = {}
        losses = []
        for label in self.labels:
            logits = self.heads[label](features)
            target = batch[label].to(logits.device).long()
            known = target != MISSING
            counts: torch.Tensor = getattr(self, f"counts_{label}")
            if self.training and not self.fixed_counts:
                counts += torch.bincount(target[known], minlength=counts.numel()).to(counts)
            if known.any():
                loss = self._loss(logits[known], target[known], counts)
                out[f"{label}/acc"] = (logits[known].argmax(1) == target[known]).float().mean().detach()
            else:
                loss = logits.sum() * 0.0  # keeps every head in the graph (DDP expects all parameters used)
            out[f"{label}/loss"] = loss.detach()
            losses.append(loss)
        out["loss"] = torch.stack(losses).mean()
        return out

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        balance = self.options["balance"]
        if balance == "focal":
            return focal_cross_entropy(logits, target, self.options["focal_gamma"]).mean()
        weight = class_weights(counts, balance)
        per_sample = nn.functional.cross_entropy(
            logits.float(), target, reduction="none", label_smoothing=self.options["label_smoothing"]
        )
        if weight is None:
            return per_sample.mean()
        w = weight.to(per_sample)[target]
        return (per_sample * w).sum() / w.sum()
