"""Probes: the kNN agrees with a slow reference, scores separate structured from random features, labels are masked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from radpretrain.pretrain.monitor import collect_features, knn_accuracy, linear_probe_accuracy, probe_scores


def slow_knn(bank: np.ndarray, bank_y: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Majority vote of the k most cosine-similar bank entries, one query at a time (ties: smallest label)."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    preds = []
    for q in query:
        nearest = np.argsort(-(bank @ q), kind="stable")[:k]
        preds.append(np.bincount(bank_y[nearest]).argmax())
    return np.array(preds)


def clusters(n: int, classes: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, dim))
    y = rng.integers(0, classes, n)
    return (centres[y] + noise * rng.normal(size=(n, dim))).astype(np.float32), y


def test_knn_matches_slow_reference() -> None:
    bank, bank_y = clusters(120, 4, 16, noise=1.5, seed=0)
    query, query_y = clusters(50, 4, 16, noise=1.5, seed=1)
    expected = float((slow_knn(bank, bank_y, query, k=20) == query_y).mean())
    assert 0.3 < expected < 1.0  # overlapping clusters: the comparison is not trivially 1.0
    assert knn_accuracy(bank, bank_y, query, query_y, k=20) == pytest.approx(expected)


def test_structured_features_score_high_and_random_ones_near_chance() -> None:
    vocab = {"body_part": ["chest", "hand", "knee", "unknown"], "age_bucket": ["0-1", "2-11"]}
    train_x, train_bp = clusters(300, 3, 32, noise=0.3, seed=2)
    val_x, val_bp = clusters(100, 3, 32, noise=0.3, seed=3)
    rng = np.random.default_rng(4)
    train = (train_x, {"body_part": train_bp, "age_bucket": rng.integers(0, 2, 300)})
    val = (val_x, {"body_part": val_bp, "age_bucket": rng.integers(0, 2, 100)})
    scores = probe_scores(train, val, vocab, k=20)
    assert scores["knn/body_part"] > 0.95 and scores["linear/body_part"] > 0.95
    assert scores["majority/body_part"] < 0.5
    # age labels are independent of the features: nothing beats chance by much
    assert abs(scores["knn/age_bucket"] - 0.5) < 0.2 and abs(scores["linear/age_bucket"] - 0.5) < 0.2


def test_missing_and_unknown_labels_are_left_out() -> None:
    vocab = {"body_part": ["chest", "hand", "unknown"]}
    x, y = clusters(200, 2, 8, noise=0.2, seed=5)
    noisy = y.copy()
    noisy[:60] = 2  # "unknown": would be unpredictable from the features
    noisy[60:90] = -1  # missing
    scores = probe_scores((x, {"body_part": noisy}), (x, {"body_part": noisy}), vocab, k=5)
    assert scores["knn/body_part"] == pytest.approx(1.0)
    # a label with a single class in the fit set gives no score rather than a meaningless one
    one = probe_scores((x, {"body_part": np.zeros(200, np.int64)}), (x, {"body_part": y}), vocab, k=5)
    assert one == {}


def test_linear_probe_fits_separable_labels() -> None:
    x, y = clusters(200, 2, 8, noise=0.2, seed=6)
    assert linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:]) == pytest.approx(1.0)


def test_collect_features_stops_at_limit_and_restores_train_mode() -> None:
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    encoder.num_features = 4  # type: ignore[assignment]
    encoder.train()
    batches = [
        {"plain": torch.randn(8, 1, 16, 16), "body_part": torch.arange(8) + 10 * i, "age_bucket": torch.zeros(8)}
        for i in range(5)
    ]
    feats, labels = collect_features(
        encoder, iter(batches), image_key="plain", labels=["body_part"], limit=20, device=torch.device("cpu")
    )
    assert feats.shape == (20, 4) and feats.dtype == np.float32
    assert labels["body_part"].tolist() == [*range(8), *range(10, 18), *range(20, 24)]
    assert encoder.training
    # eval-mode features: BatchNorm used its running statistics, so a sample's feature does not depend on its batch
    encoder.eval()
    with torch.no_grad():
        alone = encoder(batches[0]["plain"][:1]).numpy()
    np.testing.assert_allclose(feats[:1], alone, rtol=1e-5, atol=1e-6)
