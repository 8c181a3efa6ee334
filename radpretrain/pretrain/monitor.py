"""Cheap comparison of pretext tasks: kNN and linear probes of frozen encoder features on header labels."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from accelerate import Accelerator

#: Label values that are not a class to be predicted (a probe that learns "unknown" measures nothing).
IGNORED_CLASSES = ("unknown",)


@torch.no_grad()
def collect_features(
    encoder: nn.Module,
    batches: Any,
    *,
    image_key: str,
    labels: Sequence[str],
    limit: int,
    device: torch.device,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run the frozen encoder over batches until `limit` samples: features (N, D) float32 and labels (N,) int."""
    was_training = encoder.training
    encoder.eval()
    feats: list[np.ndarray] = []
    ys: dict[str, list[np.ndarray]] = {name: [] for name in labels}
    seen = 0
    try:
        for batch in batches:
            take = min(limit - seen, len(batch[image_key]))
            images = batch[image_key][:take].to(device, non_blocking=True)
            feats.append(encoder(images).float().flatten(1).cpu().numpy())
            for name in labels:
                ys[name].append(batch[name][:take].numpy().astype(np.int64))
            seen += take
            if seen >= limit:
                break
    finally:
        encoder.train(was_training)
    width = int(getattr(encoder, "num_features", 0))
    features = np.concatenate(feats) if feats else np.zeros((0, width), np.float32)
    return features, {name: (np.concatenate(v) if v else np.zeros(0, np.int64)) for name, v in ys.items()}


def knn_classifier(k: int, bank_size: int) -> Any:
    """The probes' k-nearest-neighbour vote (cosine distance), unfitted; k is capped at the bank size."""
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=max(1, min(k, bank_size)), metric="cosine", algorithm="brute")


def linear_classifier() -> Any:
    """The probes' logistic regression on standardised frozen features, unfitted."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=1.0))


def knn_accuracy(bank: np.ndarray, bank_y: np.ndarray, query: np.ndarray, query_y: np.ndarray, *, k: int) -> float:
    """Top-1 accuracy of a k-nearest-neighbour vote (cosine distance) with the bank as neighbours."""
    return float(knn_classifier(k, len(bank)).fit(bank, bank_y).score(query, query_y))


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> float:
    """Accuracy of a logistic regression on standardised frozen features (fit on train, scored on val)."""
    return float(linear_classifier().fit(train_x, train_y).score(val_x, val_y))


def probe_scores(
    train: tuple[np.ndarray, dict[str, np.ndarray]],
    val: tuple[np.ndarray, dict[str, np.ndarray]],
    vocab: dict[str, list[str]],
    *,
    k: int,
) -> dict[str, float]:
    """{"knn/<label>", "linear/<label>", "majority/<label>": accuracy} for each label with two or more classes."""
    scores: dict[str, float] = {}
    train_x, train_labels = train
    val_x, val_labels = val
    for name, train_y in train_labels.items():
        val_y = val_labels[name]
        ignored = [i for i, value in enumerate(vocab.get(name, [])) if value in IGNORED_CLASSES]
        keep_t = (train_y >= 0) & ~np.isin(train_y, ignored)
        keep_v = (val_y >= 0) & ~np.isin(val_y, ignored)
        if keep_v.sum() == 0 or len(np.unique(train_y[keep_t])) < 2:
            continue  # nothing to score, or a single class: no probe can show anything
        tx, ty, vx, vy = train_x[keep_t], train_y[keep_t], val_x[keep_v], val_y[keep_v]
        scores[f"knn/{name}"] = knn_accuracy(tx, ty, vx, vy, k=k)
        scores[f"linear/{name}"] = linear_probe_accuracy(tx, ty, vx, vy)
        majority = np.bincount(ty).argmax()
        scores[f"majority/{name}"] = float((vy == majority).mean())
    return scores


def run_probes(
    accelerator: Accelerator,
    encoder: nn.Module,
    make_batches: Callable[[str], Any],
    vocab: dict[str, list[str]],
    *,
    labels: Sequence[str],
    train_samples: int,
    val_samples: int,
    k: int,
    image_key: str,
) -> dict[str, float]:
    """Probe scores from every process's share of the train and val splits (all processes call this).

    `make_batches(split)` yields this process's batches of the split (the shard reader splits by
    process). Features are gathered to every process; the scores are the same on all of them.
    """
    from accelerate.utils import gather_object

    world = accelerator.num_processes
    parts = {}
    for split, total in (("train", train_samples), ("val", val_samples)):
        limit = -(-total // world)
        local = collect_features(
            encoder,
            make_batches(split),
            image_key=image_key,
            labels=labels,
            limit=limit,
            device=accelerator.device,
        )
        gathered = gather_object([local]) if world > 1 else [local]
        parts[split] = (
            np.concatenate([g[0] for g in gathered]),
            {name: np.concatenate([g[1][name] for g in gathered]) for name in labels},
        )
    scores = probe_scores(parts["train"], parts["val"], vocab, k=k)
    scores["train_samples"] = len(parts["train"][0])
    scores["val_samples"] = len(parts["val"][0])
    return scores


def probe_labels(labels: Sequence[str], trained: Iterable[str], cohort: str | Path | None) -> dict[str, dict[str, Any]]:
    """{label: {"trained_on": bool}} for every probe of a run, plus {"cohort": {"trained_on": False, "name"}}.

    A probe label some task of the run learned to predict (`trained`) measures that training, not transfer;
    the cohort is never seen by a pretext task. Only the cohort's folder or file name is kept, never its path.
    """
    trained = set(trained)
    marks: dict[str, dict[str, Any]] = {name: {"trained_on": name in trained} for name in labels}
    if cohort is not None:
        from radpretrain.pretrain.probe import COHORT

        marks[COHORT] = {"trained_on": False, "name": Path(cohort).name}
    return marks


def probe_note(labels: Sequence[str], probe: Mapping[str, Any]) -> str | None:
    """Why some of `labels` have no score in `probe` (fewer than two classes among the probed images), or None."""
    unscored = [name for name in labels if f"knn/{name}" not in probe]
    if not unscored:
        return None
    if not any("/" in key for key in probe):
        return (
            f"no probe label has two classes among the probed images ({', '.join(unscored) or 'no labels'}): "
            "nothing was scored; add a labeled cohort (probe.cohort=PATH) or probe shards with varied headers"
        )
    return f"not scored: {', '.join(unscored)} (fewer than two classes among the probed images)"
