"""Finetune metrics against hand computation and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from radpretrain.finetune.metrics import classification_metrics, segmentation_metrics


def test_segmentation_metrics_match_hand_computation():
    truth = torch.zeros(2, 1, 16, 16)
    truth[0, 0, 4:8, 4:8] = 1  # 16 pixels
    truth[1, 0, 2:12, 2:12] = 1
    pred = torch.zeros_like(truth)
    pred[0, 0, 4:8, 6:10] = 1  # shifted 2 px: overlap 8
    pred[1, 0, 2:12, 2:12] = 1
    logits = pred * 20 - 10
    m = segmentation_metrics(logits, truth)
    # Dice 2*8/32 = 0.5 and 1; IoU 8/24 and 1.
    assert m["dice"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["iou"] == pytest.approx((8 / 24 + 1.0) / 2)
    # Surface points of a 2-px shift are at most 2 px from the other surface; identical masks: 0.
    assert 0.0 < m["hd95"] <= 1.0 + 1e-6
    empty = segmentation_metrics(torch.full_like(truth, -10.0), truth)
    assert empty["dice"] == 0.0 and math.isnan(empty["hd95"])


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, 1, 0])
    logits = torch.from_numpy(rng.normal(size=(10, 2))).float() + torch.nn.functional.one_hot(labels, 2) * 0.8
    m = classification_metrics(logits, labels)
    probs = logits.softmax(1).numpy()
    assert m["auroc"] == pytest.approx(roc_auc_score(labels.numpy(), probs[:, 1]))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels.numpy(), probs.argmax(1)))
    three = torch.tensor([0, 1, 2, 2, 1, 0])
    m3 = classification_metrics(torch.nn.functional.one_hot(three, 3).float() * 5, three)
    assert m3 == {"auroc": pytest.approx(1.0), "accuracy": 1.0, "balanced_accuracy": 1.0}
