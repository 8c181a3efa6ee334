"""Finetune metrics against hand computation and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from radpretrain.finetune.metrics import classification_metrics, evaluate, segmentation_metrics


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
    assert m["hd95_failed"] == 0.0
    empty = segmentation_metrics(torch.full_like(truth, -10.0), truth)
    assert empty["dice"] == 0.0 and math.isnan(empty["hd95"]) and empty["hd95_failed"] == 2.0


def _logits(mask: torch.Tensor) -> torch.Tensor:
    return mask * 20 - 10


def test_an_empty_prediction_fails_hd95_instead_of_being_dropped() -> None:
    truth = torch.zeros(2, 1, 16, 16)
    truth[:, 0, 4:10, 4:10] = 1
    # "lazy" is exact on case 0 and predicts nothing on case 1; "tries" is 1 px off on both.
    lazy = truth.clone()
    lazy[1] = 0
    tries = torch.roll(truth, shifts=1, dims=3)
    lazy_m, tries_m = segmentation_metrics(_logits(lazy), truth), segmentation_metrics(_logits(tries), truth)
    assert tries_m["hd95"] == pytest.approx(1.0) and tries_m["hd95_failed"] == 0.0
    # Averaging over the finite cases only would give lazy 0.0, better than tries: counted and NaN instead.
    assert math.isnan(lazy_m["hd95"]) and lazy_m["hd95_failed"] == 1.0
    # A mask predicted where the truth is empty fails too; empty predicted empty is perfect (Dice 1, HD95 0).
    none = torch.zeros(2, 1, 16, 16)
    false_alarm = segmentation_metrics(_logits(truth), none)
    assert math.isnan(false_alarm["hd95"]) and false_alarm["hd95_failed"] == 2.0
    quiet = segmentation_metrics(_logits(none), none)
    assert quiet == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "hd95_failed": 0.0}


def test_masks_are_scored_on_the_valid_region_only() -> None:
    truth = torch.zeros(2, 1, 16, 24)
    truth[0, 0, 4:10, 8:14] = 1
    truth[1, 0, 2:12, 6:18] = 1
    pred = torch.roll(truth, shifts=2, dims=2)
    valid = torch.zeros_like(truth, dtype=torch.bool)
    valid[..., 4:20] = True  # letterbox padding: 4 columns each side
    junk = pred.clone()
    junk[..., :4] = 1  # a prediction in the padding must not cost anything
    junk[..., 20:] = 1
    scored = segmentation_metrics(_logits(junk), truth, valid)
    cropped = segmentation_metrics(_logits(pred[..., 4:20]), truth[..., 4:20])
    assert scored == pytest.approx(cropped)
    unmasked = segmentation_metrics(_logits(junk), truth)
    assert unmasked["dice"] < scored["dice"] - 0.1
    with pytest.raises(ValueError, match="valid has shape"):
        segmentation_metrics(_logits(pred), truth, valid[..., :8])


def test_evaluate_passes_the_items_valid_region_to_the_metrics() -> None:
    truth = torch.zeros(1, 16, 24)
    truth[0, 4:10, 8:14] = 1
    valid = torch.zeros(1, 16, 24, dtype=torch.bool)
    valid[..., 4:20] = True
    junk = truth.clone()
    junk[..., :4] = 1

    class Fixed(torch.nn.Module):
        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return _logits(junk).expand(image.shape[0], -1, -1, -1)

    item = {"image": torch.zeros(1, 16, 24), "target": truth, "valid": valid}
    loss = torch.nn.BCEWithLogitsLoss()
    with_valid = evaluate(Fixed(), [item, item], "seg", loss, torch.device("cpu"), 2)
    unpadded = {k: v for k, v in item.items() if k != "valid"}
    without = evaluate(Fixed(), [unpadded, unpadded], "seg", loss, torch.device("cpu"), 2)
    assert with_valid["dice"] == 1.0 and with_valid["hd95"] == 0.0 and without["dice"] < 1.0


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
