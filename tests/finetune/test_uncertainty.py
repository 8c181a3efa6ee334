"""Test-set uncertainty: DeLong's test against a slow O(n^2) reference, weighted scores against scikit-learn and the
finetune metrics, and patient-level resampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from radpretrain.finetune import uncertainty
from radpretrain.finetune.metrics import classification_metrics


def slow_delong(a: list[float], b: list[float], positive: list[bool]) -> tuple[float, float, float, float]:
    """DeLong et al. 1988 by their definitions: psi(x, y) = 1, ½, 0 for x >, =, < y; V10(X_i) = mean_j psi(X_i, Y_j),
    V01(Y_j) = mean_i psi(X_i, Y_j); var = S10 / m + S01 / n per score and covariance likewise. Returns
    (auc_a, auc_b, z, p)."""
    from scipy.stats import norm

    def psi(x: float, y: float) -> float:
        return 1.0 if x > y else 0.5 if x == y else 0.0

    def components(scores):
        xs = [s for s, p in zip(scores, positive, strict=True) if p]
        ys = [s for s, p in zip(scores, positive, strict=True) if not p]
        v10 = [sum(psi(x, y) for y in ys) / len(ys) for x in xs]
        v01 = [sum(psi(x, y) for x in xs) / len(xs) for y in ys]
        return sum(v10) / len(v10), v10, v01

    def cov(u, v):
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        return sum((x - mu) * (y - mv) for x, y in zip(u, v, strict=True)) / (len(u) - 1)

    auc_a, a10, a01 = components(a)
    auc_b, b10, b01 = components(b)
    m, n = len(a10), len(a01)
    s10 = cov(a10, a10) + cov(b10, b10) - 2 * cov(a10, b10)
    s01 = cov(a01, a01) + cov(b01, b01) - 2 * cov(a01, b01)
    var = s10 / m + s01 / n
    z = (auc_a - auc_b) / math.sqrt(var)
    return auc_a, auc_b, z, 2 * norm.sf(abs(z))


def test_delong_matches_the_slow_definition_with_ties():
    rng = np.random.default_rng(0)
    positive = rng.random(40) < 0.4
    truth = positive * 1.0
    # Rounded scores: many ties, within and across classes.
    a = np.round(truth + rng.normal(0, 0.8, 40), 1)
    b = np.round(truth * 0.5 + rng.normal(0, 0.8, 40), 1)
    fast = uncertainty.delong_test(a, b, positive)
    auc_a, auc_b, z, p = slow_delong(a.tolist(), b.tolist(), positive.tolist())
    assert (fast["auc_a"], fast["auc_b"], fast["z"], fast["p"]) == pytest.approx((auc_a, auc_b, z, p), rel=1e-9)


def test_delong_on_a_hand_sized_example():
    # 3 positives, 2 negatives. a ranks every positive above every negative but one pair; b ties one pair.
    positive = [True, True, True, False, False]
    a = [0.9, 0.8, 0.4, 0.7, 0.3]  # pairs (x > y): .9>.7 .9>.3 .8>.7 .8>.3 .4<.7 .4>.3 -> 5 of 6
    b = [0.6, 0.5, 0.9, 0.5, 0.2]  # .6>.5 .6>.2 .5=.5 .5>.2 .9>.5 .9>.2 -> 5.5 of 6
    fast = uncertainty.delong_test(a, b, positive)
    assert fast["auc_a"] == pytest.approx(5 / 6) and fast["auc_b"] == pytest.approx(5.5 / 6)
    # V10 of a: (1, 1, ½), of b: (1, ¾, 1); V01 of a: (⅔, 1), of b: (⅚, 1). By hand:
    # var(V10a) = 1/12, var(V10b) = 1/48, cov = -1/48; var(V01a) = 1/18, var(V01b) = 1/72, cov = 1/36.
    var = (1 / 12 + 1 / 48 + 2 / 48) / 3 + (1 / 18 + 1 / 72 - 2 / 36) / 2
    assert fast["se"] == pytest.approx(math.sqrt(var))
    assert fast["z"] == pytest.approx((5 / 6 - 5.5 / 6) / math.sqrt(var))
    assert slow_delong(a, b, positive)[3] == pytest.approx(fast["p"])


def test_delong_edge_cases():
    positive = [True, True, False, False]
    same = uncertainty.delong_test([1, 2, 0, 0.5], [1, 2, 0, 0.5], positive)
    assert (same["z"], same["p"], same["diff"]) == (0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="at least 2 positive and 2 negative"):
        uncertainty.delong_test([1, 2, 3], [1, 2, 3], [True, False, False])


def test_weighted_auroc_is_sklearns_on_the_repeated_cases():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=30), 1)
    positive = rng.random(30) < 0.5
    assert uncertainty.weighted_auroc(scores, positive, np.ones((1, 30)))[0] == pytest.approx(
        roc_auc_score(positive, scores)
    )
    weights = rng.integers(0, 4, size=(5, 30)).astype(float)
    expected = [roc_auc_score(np.repeat(positive, w.astype(int)), np.repeat(scores, w.astype(int))) for w in weights]
    assert uncertainty.weighted_auroc(scores, positive, weights) == pytest.approx(expected)


@pytest.mark.parametrize("classes", [2, 3])
def test_weighted_classification_scores_are_the_finetune_metrics(classes):
    rng = np.random.default_rng(classes)
    labels = rng.integers(0, classes, size=24)
    logits = rng.normal(size=(24, classes)) + np.eye(classes)[labels]
    per_case = {"labels": labels.tolist(), "logits": logits.tolist()}
    weights = np.vstack([np.ones(24), rng.integers(0, 3, size=(3, 24))])
    for row in weights:
        keep = np.repeat(np.arange(24), row.astype(int))
        if len(set(labels[keep])) < classes:
            continue
        expected = classification_metrics(torch.tensor(logits[keep]).float(), torch.tensor(labels[keep]))
        for name in ("auroc", "accuracy", "balanced_accuracy"):
            assert uncertainty.weighted_metric(per_case, name, row)[0] == pytest.approx(expected[name], abs=1e-6)


def test_segmentation_scores_average_the_finite_cases():
    per_case = {"patients": [0, 0, 1], "dice": [0.5, 0.7, 0.9], "hd95": [2.0, math.nan, 4.0]}
    assert uncertainty.weighted_metric(per_case, "dice", np.ones(3))[0] == pytest.approx(0.7)
    assert uncertainty.weighted_metric(per_case, "hd95", np.array([[1, 1, 1], [0, 2, 0]])) == pytest.approx(
        [3.0, math.nan], nan_ok=True
    )


def test_patient_weights_resample_whole_patients():
    patients = [0, 0, 0, 1, 2, 2, 3]
    weights = uncertainty.patient_weights(patients, 500, seed=3)
    assert weights.shape == (500, 7)
    # A patient's cases move together, and each resample draws as many patients as there are.
    assert np.all(weights[:, 0] == weights[:, 1]) and np.all(weights[:, 4] == weights[:, 5])
    assert np.all(weights[:, [0, 3, 4, 6]].sum(axis=1) == 4)
    assert np.array_equal(weights, uncertainty.patient_weights(patients, 500, seed=3))
    assert not np.array_equal(weights, uncertainty.patient_weights(patients, 500, seed=4))


def test_patient_level_intervals_are_wider_than_case_level_ones_for_clustered_cases():
    # Eight patients, four near-identical images each: the test set holds 8 independent values, not 32.
    rng = np.random.default_rng(5)
    per_patient = rng.uniform(0.4, 0.9, 8)
    dice = np.repeat(per_patient, 4).tolist()
    by_patient = {"patients": np.repeat(np.arange(8), 4).tolist(), "dice": dice}
    by_case = {"patients": list(range(32)), "dice": dice}
    low, high = uncertainty.bootstrap_interval(by_patient, "dice", resamples=4000, seed=0)
    case_low, case_high = uncertainty.bootstrap_interval(by_case, "dice", resamples=4000, seed=0)
    assert low < np.mean(dice) < high
    assert (high - low) > 1.6 * (case_high - case_low)  # about sqrt(4) = 2 times wider
    # The interval of a mean over 8 patients: close to mean ± 1.96 · sd / sqrt(8).
    half = 1.96 * np.std(per_patient) / math.sqrt(8)
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
