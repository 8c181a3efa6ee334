"""Test-set uncertainty from per-case outputs: patient-level bootstrap intervals and DeLong's paired AUROC test.

- [0] Efron & Tibshirani, An Introduction to the Bootstrap, 1993 (percentile interval; resampling clusters).
- [1] DeLong, DeLong & Clarke-Pearson, Comparing the areas under two or more correlated ROC curves, Biometrics
  44(3), 1988, https://doi.org/10.2307/2531595
- [2] Sun & Xu, Fast implementation of DeLong's algorithm for comparing the areas under correlated ROC curves,
  IEEE Signal Processing Letters 21(11), 2014, https://doi.org/10.1109/LSP.2014.2337313
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 2000
INTERVAL_LEVEL = 0.95
#: Metrics a per-case segmentation record holds; classification records hold labels and logits instead.
CLASSIFICATION_METRICS = ("auroc", "accuracy", "balanced_accuracy")


# --------------------------------------------------------------------------------------------------------------
# Patient-level bootstrap.
# --------------------------------------------------------------------------------------------------------------


def patient_weights(patients: Sequence[int], resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, cases) case multiplicities: each resample draws as many patients as the test set has, with
    replacement (seeded), and a drawn patient brings all its cases [0]. Patients are small integers per case."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    groups = np.asarray(patients, dtype=np.int64)
    if groups.size == 0:
        return np.zeros((resamples, 0))
    _, index = np.unique(groups, return_inverse=True)
    count = int(index.max()) + 1
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, count, size=(resamples, count))
    # Counts per (resample, patient) in one bincount; float32 holds these small counts exactly and halves the
    # memory of (resamples, cases) matrices.
    flat = (drawn + np.arange(resamples)[:, None] * count).ravel()
    per_patient = np.bincount(flat, minlength=resamples * count).reshape(resamples, count).astype(np.float32)
    return per_patient[:, index]


def weighted_metric(per_case: dict[str, Any], metric: str, weights: np.ndarray) -> np.ndarray:
    """The metric of each weighting (rows of `weights`, one column per case; a row of ones is the run's own
    score): the mean of finite per-case values for segmentation metrics, the weighted AUROC (macro one-vs-rest,
    ties counted half), accuracy or balanced accuracy from labels and logits for classification. NaN where a
    weighting leaves the metric undefined (no finite case, or one class only)."""
    weights = np.atleast_2d(np.asarray(weights))
    if "logits" in per_case:
        logits = np.asarray(per_case["logits"], dtype=np.float64)
        labels = np.asarray(per_case["labels"], dtype=np.int64)
        return _classification(logits, labels, metric, weights)
    if metric not in per_case:
        raise KeyError(f"metric '{metric}' has no per-case values")
    values = np.asarray(per_case[metric], dtype=np.float64)
    finite = np.isfinite(values)
    used = weights[:, finite]
    total = used.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, used @ values[finite] / total, np.nan)


def _classification(logits: np.ndarray, labels: np.ndarray, metric: str, weights: np.ndarray) -> np.ndarray:
    classes = logits.shape[1]
    if metric == "auroc":
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        # Two classes: the AUROC of class 1's score (as classification_metrics); more: the macro mean.
        columns = [1] if classes == 2 else list(range(classes))
        per_class = np.stack([weighted_auroc(probs[:, k], labels == k, weights) for k in columns])
        return per_class.mean(axis=0)
    correct = (logits.argmax(axis=1) == labels).astype(np.float64)
    if metric == "accuracy":
        with np.errstate(invalid="ignore", divide="ignore"):
            return weights @ correct / weights.sum(axis=1)
    if metric == "balanced_accuracy":
        recalls = []
        for k in range(classes):
            mine = (labels == k).astype(np.float64)
            total = weights @ mine
            with np.errstate(invalid="ignore", divide="ignore"):
                recalls.append(np.where(total > 0, weights @ (mine * correct) / total, np.nan))
        # Over the classes present in the (resampled) truth, as scikit-learn does.
        with np.errstate(invalid="ignore"):
            return np.nanmean(np.stack(recalls), axis=0)
    raise KeyError(f"metric '{metric}' is not a classification metric ({', '.join(CLASSIFICATION_METRICS)})")


def weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of `scores` for the `positive` cases under each row of case weights: P(score+ > score-) + ½ P(=).

    One sort, then one cumulative sum of negative weight along the sorted cases: a positive case wins against
    the negative weight below its score level and ties with the negative weight on it. O(rows · cases), no
    per-resample ranking. NaN without both sides.
    """
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    new_level = np.r_[True, ranked[1:] != ranked[:-1]]
    starts = np.flatnonzero(new_level)  # first sorted case of each score level
    ends = np.r_[starts[1:], ranked.size]  # one past its last
    level = np.cumsum(new_level) - 1  # each sorted case's level
    # Cases as rows (cases x weightings), so the cumulative sum runs over contiguous memory.
    w = np.ascontiguousarray(np.atleast_2d(weights).T, dtype=np.float64)[order]
    is_pos = positive[order]
    below = np.zeros((ranked.size + 1, w.shape[1]))
    np.cumsum(np.where(is_pos[:, None], 0.0, w), axis=0, out=below[1:])  # negative weight before each case
    mine = level[is_pos]
    start_of, end_of = below[starts[mine]], below[ends[mine]]
    wins = (w[is_pos] * (start_of + 0.5 * (end_of - start_of))).sum(axis=0)
    pairs = w[is_pos].sum(axis=0) * below[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def percentile_interval(values: np.ndarray, level: float = INTERVAL_LEVEL) -> tuple[float, float]:
    """The (1 - level)/2 and (1 + level)/2 quantiles of the finite bootstrap values; NaN when none is finite."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_interval(
    per_case: dict[str, Any],
    metric: str,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = INTERVAL_LEVEL,
) -> tuple[float, float]:
    """Percentile interval of one run's metric over patient-level bootstrap resamples of its test set."""
    weights = patient_weights(per_case["patients"], resamples, seed)
    return percentile_interval(weighted_metric(per_case, metric, weights), level)


# --------------------------------------------------------------------------------------------------------------
# DeLong's test of two correlated AUROCs.
# --------------------------------------------------------------------------------------------------------------


def _midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of each row, ties given the mean of their ranks."""
    from scipy.stats import rankdata

    return np.asarray(rankdata(x, axis=-1), dtype=np.float64)


def delong_covariance(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUROCs, covariance) of k score vectors on the same cases, by Sun & Xu's midrank algorithm [2] for
    DeLong's structural components [1]. `scores`: (k, cases); `positive`: boolean per case (both classes needed).

    With m positives X and n negatives Y: AUC = (Σ rank_Z(X_i) - m(m+1)/2) / (m n); V10_i = (rank_Z(X_i) -
    rank_X(X_i)) / n, V01_j = 1 - (rank_Z(Y_j) - rank_Y(Y_j)) / m; Cov = S10 / m + S01 / n.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    positive = np.asarray(positive, dtype=bool)
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs at least 2 positive and 2 negative cases, got {m} and {n}")
    x, y = scores[:, positive], scores[:, ~positive]
    tx, ty, tz = _midranks(x), _midranks(y), _midranks(np.concatenate([x, y], axis=1))
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_test(
    scores_a: Sequence[float] | np.ndarray,
    scores_b: Sequence[float] | np.ndarray,
    positive: Sequence[bool] | np.ndarray,
) -> dict[str, float]:
    """DeLong's two-sided test of AUROC(a) = AUROC(b) on the same cases [1, 2]: {auc_a, auc_b, diff, se, z, p}.
    Identical rankings (se 0, diff 0) give z 0 and p 1."""
    from scipy.stats import norm

    aucs, cov = delong_covariance(np.stack([np.asarray(scores_a), np.asarray(scores_b)]), np.asarray(positive))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    # Identical rankings have no variance: no difference (z 0), or a difference without noise (z ±inf).
    flat = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    z = diff / se if se > 0.0 else flat
    p = float(2 * norm.sf(abs(z)))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff, "se": se, "z": z, "p": p}


def binary_scores(per_case: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(class-1 score, is-positive) of a two-class per-case record (logit difference: the same ranking as
    class 1's probability), or None for segmentation or more than two classes."""
    if "logits" not in per_case:
        return None
    logits = np.asarray(per_case["logits"], dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != 2:
        return None
    return logits[:, 1] - logits[:, 0], np.asarray(per_case["labels"]) == 1
