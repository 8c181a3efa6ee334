"""results.jsonl -> mean (sd) tables, paired differences against a baseline with honest small-sample statistics, and
learning-curve plots."""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from radpretrain.errors import ConfigError
from radpretrain.finetune.uncertainty import (
    DEFAULT_RESAMPLES,
    binary_scores,
    delong_test,
    patient_weights,
    percentile_interval,
    weighted_metric,
)
from radpretrain.registry import did_you_mean

#: Metrics in the order a report picks its default from; all but hd95 (and its failed-case count) are
#: higher-is-better.
METRIC_PREFERENCE = ("dice", "auroc", "balanced_accuracy", "accuracy", "iou")
LOWER_IS_BETTER = frozenset({"hd95", "hd95_failed", "loss"})

#: Fewer pairs get no interval: below 6 the sd of the differences rests on at most 4 degrees of freedom, and
#: an exact two-sided sign-flip or Wilcoxon p cannot go below 2 / 2^n (0.25 at 3 pairs, 0.0625 at 5).
MIN_PAIRS_FOR_INTERVAL = 6
TOO_FEW_PAIRS = "too few pairs for an interval"
#: Up to this many pairs the sign-flip p enumerates all 2^n sign patterns; above it, a seeded Monte-Carlo.
EXACT_SIGN_FLIPS_MAX = 20
DEFAULT_SIGN_FLIPS = 100_000
INTERVAL_LEVEL = 0.95


@dataclass(frozen=True)
class Summary:
    """Mean and sample sd (ddof=1) of one metric over the repeats of one arm and label count.

    `runs` counts every finished run of the cell, `failed` those whose metric is not finite (e.g. HD95 of an
    empty prediction, NaN or inf in results.jsonl); mean and sd are over the `runs - failed` others.
    `test_low`/`test_high`: the 95 % patient-level bootstrap interval of the mean over the test set (each
    resample of the test patients recomputes every run's metric from its per-case outputs; NaN when a run
    has none). `selection`: the model-selection rule of the cell's runs ("; "-joined if they differ).
    """

    arm: str
    n_labels: int
    mean: float
    sd: float
    runs: int
    failed: int = 0
    test_low: float = math.nan
    test_high: float = math.nan
    selection: str = ""


@dataclass(frozen=True)
class Paired:
    """An arm minus the baseline, paired by encoder, label count and repeat (the same labeled subset and seed).

    A pair where either run failed (a non-finite metric) is left out of the difference, the interval and the
    p-values, and counted in `excluded` (`arm_failed` and `baseline_failed` say which side; both may have).
    `t_low`/`t_high` are NaN below MIN_PAIRS_FOR_INTERVAL pairs; the Holm columns are adjusted across all the
    comparisons of one report.
    """

    arm: str
    n_labels: int
    pairs: int
    mean_diff: float
    sd_diff: float
    t_low: float
    t_high: float
    p_sign_flip: float
    p_wilcoxon: float
    excluded: int = 0
    arm_failed: int = 0
    baseline_failed: int = 0
    sign_flip_exact: bool = True
    p_sign_flip_holm: float = math.nan
    p_wilcoxon_holm: float = math.nan


SUMMARY_COLUMNS = ("arm", "n_labels", "metric", "mean", "sd", "runs", "failed", "test_low", "test_high", "selection")
DELONG_COLUMNS = (
    "arm",
    "baseline",
    "n_labels",
    "repeat",
    "auroc_arm",
    "auroc_baseline",
    "diff",
    "se",
    "z",
    "p_delong",
)
#: Written in place of a selection rule by runs made before results recorded one.
UNKNOWN_SELECTION = "not recorded"
PAIRED_COLUMNS = (
    "arm",
    "baseline",
    "n_labels",
    "metric",
    "pairs",
    "excluded",
    "arm_failed",
    "baseline_failed",
    "mean_diff",
    "sd_diff",
    "t_low",
    "t_high",
    "p_sign_flip",
    "p_sign_flip_holm",
    "sign_flip",
    "p_wilcoxon",
    "p_wilcoxon_holm",
)


@dataclass(frozen=True)
class DeLong:
    """DeLong's paired test of an arm's AUROC against the baseline's on the same test set, in one repeat."""

    arm: str
    n_labels: int
    repeat: int
    auroc_arm: float
    auroc_baseline: float
    diff: float
    se: float
    z: float
    p: float


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    summary_csv: Path
    paired_csv: Path
    plot: Path
    delong_csv: Path | None = None


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Read a sweep's results.jsonl (one finished cell per line)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.is_file():
        raise ConfigError(f"results file not found: {path} (run `radpretrain sweep CONFIG` first)")
    rows = []
    text = path.read_text(errors="replace")  # bytes that are not UTF-8 make their line "not JSON" below
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                break  # the line a running sweep is writing now
            raise ConfigError(f"{path} line {number} is not JSON; remove the line and rerun") from None
    if not rows:
        raise ConfigError(f"{path} holds no results yet")
    return rows


def arm_name(row: dict[str, Any], several_encoders: bool) -> str:
    """The plotted/tabled arm: the strategy, with the encoder's name when a sweep compares encoders."""
    if not several_encoders:
        return str(row["strategy"])
    return f"{row['strategy']} [{Path(str(row['encoder'])).name}]"


def pick_metric(rows: list[dict[str, Any]], metric: str | None) -> str:
    available = sorted({name for row in rows for name in row.get("metrics", {})})
    if metric is not None:
        if metric not in available:
            raise ConfigError(f"metric '{metric}' is not in the results; available: {', '.join(available)}")
        return metric
    for name in METRIC_PREFERENCE:
        if name in available:
            return name
    raise ConfigError(f"no known metric in the results; available: {', '.join(available) or 'none'}")


def metric_value(row: dict[str, Any], metric: str) -> float | None:
    """The row's metric as a float, or None when the run failed: missing, not a number, NaN or inf."""
    value = row.get("metrics", {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def summarize(
    rows: list[dict[str, Any]], metric: str, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> list[Summary]:
    """Mean (sd) per arm and label count over the runs with a finite value (the others are counted as failed),
    the test-set bootstrap interval of that mean (`resamples` seeded patient-level resamples, the same ones for
    every cell on one test set) and the cells' selection rule."""
    several = len({row["encoder"] for row in rows}) > 1
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(arm_name(row, several), int(row["n_labels"]))].append(row)
    weights: dict[tuple[Any, ...], np.ndarray] = {}
    out = []
    # Arms in the order the sweep ran them (its `strategies` list), label counts ascending.
    order = {arm: i for i, arm in enumerate(dict.fromkeys(arm for arm, _ in groups))}
    for (arm, n), cell in sorted(groups.items(), key=lambda item: (order[item[0][0]], item[0][1])):
        values = [v for v in (metric_value(row, metric) for row in cell) if v is not None]
        mean = float(np.mean(values)) if values else math.nan
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        low, high = cell_test_interval(cell, metric, weights, resamples=resamples, seed=seed)
        rules = dict.fromkeys(str(row.get("selection", UNKNOWN_SELECTION)) for row in cell)
        out.append(
            Summary(
                arm,
                n,
                mean,
                sd,
                runs=len(cell),
                failed=len(cell) - len(values),
                test_low=low,
                test_high=high,
                selection="; ".join(rules),
            )
        )
    return out


def cell_test_interval(
    cell: list[dict[str, Any]],
    metric: str,
    cache: dict[tuple[Any, ...], np.ndarray],
    *,
    resamples: int,
    seed: int,
) -> tuple[float, float]:
    """Percentile interval of the cell's mean metric over patient-level resamples of the test set: each resample
    recomputes every successful run's metric from its per-case outputs and averages them. NaN when a successful
    run kept no per-case outputs (results from before they were recorded). `cache` keeps one weight matrix per
    test set, so every cell on it sees the same resamples."""
    runs = [row for row in cell if metric_value(row, metric) is not None]
    if not runs:
        return math.nan, math.nan
    draws = []
    for row in runs:
        per_case = row.get("per_case") or {}
        if "patients" not in per_case:
            return math.nan, math.nan
        key = (row.get("test_set"), tuple(per_case["patients"]))
        if key not in cache:
            cache[key] = patient_weights(per_case["patients"], resamples, seed)
        try:
            draws.append(weighted_metric(per_case, metric, cache[key]))
        except KeyError:
            return math.nan, math.nan
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample where every run is undefined: NaN
        means = np.nanmean(np.stack(draws), axis=0)
    return percentile_interval(means)


def t_interval(diffs: Sequence[float] | np.ndarray, level: float = INTERVAL_LEVEL) -> tuple[float, float]:
    """Student-t confidence interval of the mean paired difference, mean ± t(1 - α/2, n - 1) · sd / √n;
    NaN for fewer than two pairs (one pair says nothing about spread)."""
    from scipy.stats import t

    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.size < 2:
        return math.nan, math.nan
    mean = float(diffs.mean())
    half = float(t.ppf(0.5 + level / 2.0, diffs.size - 1)) * float(diffs.std(ddof=1)) / math.sqrt(diffs.size)
    return mean - half, mean + half


def sign_flip_p(
    diffs: Sequence[float] | np.ndarray,
    *,
    flips: int = DEFAULT_SIGN_FLIPS,
    seed: int = 0,
    exact_max: int = EXACT_SIGN_FLIPS_MAX,
) -> float:
    """Two-sided paired permutation p of the mean difference: scipy's sign-flip `permutation_test`, exact over
    all 2^n sign patterns for n <= `exact_max`; above, `flips` seeded random patterns (scipy counts the observed
    pattern among them, so a Monte-Carlo p is never an impossible 0). NaN without pairs."""
    from scipy.stats import permutation_test

    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.size == 0:
        return math.nan
    if diffs.size == 1:  # both sign patterns reach |d| (scipy wants two observations)
        return 1.0
    if diffs.size > exact_max and flips < 1:
        raise ValueError(f"flips must be >= 1, got {flips}")
    result = permutation_test(
        (diffs,),
        np.mean,
        permutation_type="samples",  # one sample: each difference keeps or flips its sign
        n_resamples=math.inf if diffs.size <= exact_max else flips,
        vectorized=True,
        axis=-1,
        batch=1 << 16,  # 2^20 patterns of 20 pairs at once would take 170 MB
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return float(result.pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (Holm 1979), in the input order; NaN entries are no test and stay NaN.

    Sorted ascending, the k-th of m p-values becomes max over j <= k of min(1, (m - j + 1) · p_(j)).
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, math.nan)
    tested = np.flatnonzero(np.isfinite(p))
    running = 0.0
    for rank, i in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running = max(running, min(1.0, (tested.size - rank) * float(p[i])))
        out[i] = running
    return [float(v) for v in out]


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value (scipy; exact for small samples), NaN when undefined."""
    from scipy.stats import wilcoxon

    diffs = np.asarray(diffs, dtype=np.float64)
    if np.count_nonzero(diffs) == 0:
        return math.nan  # no pairs, or no non-zero difference to rank
    return float(wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_differences(
    rows: list[dict[str, Any]],
    metric: str,
    *,
    baseline: str = "random",
    flips: int = DEFAULT_SIGN_FLIPS,
    seed: int = 0,
    min_pairs: int = MIN_PAIRS_FOR_INTERVAL,
) -> list[Paired]:
    """Each arm minus `baseline` on the same encoder, label count and repeat (so the same labeled subset), with a
    t-interval (from `min_pairs` pairs on), sign-flip and Wilcoxon p-values, and their Holm adjustment across
    all the comparisons returned. Pairs with a failed run are counted, not used (see `Paired`)."""
    several = len({row["encoder"] for row in rows}) > 1
    base: dict[tuple[str, int, int], float | None] = {}
    for row in rows:
        if row["strategy"] == baseline:
            base[(str(row["encoder"]), int(row["n_labels"]), int(row["repeat"]))] = metric_value(row, metric)
    if not base:
        return []
    diffs: dict[tuple[str, int], list[float]] = defaultdict(list)
    failed: dict[tuple[str, int], list[tuple[bool, bool]]] = defaultdict(list)
    for row in rows:
        key = (str(row["encoder"]), int(row["n_labels"]), int(row["repeat"]))
        if row["strategy"] == baseline or key not in base:
            continue
        cell = (arm_name(row, several), int(row["n_labels"]))
        diffs.setdefault(cell, [])  # a cell whose every pair failed still gets its row
        ref, value = base[key], metric_value(row, metric)
        if ref is None or value is None:
            failed[cell].append((value is None, ref is None))
            continue
        diffs[cell].append(value - ref)
    out = []
    order = {arm: i for i, arm in enumerate(dict.fromkeys(arm for arm, _ in diffs))}
    for cell, values in sorted(diffs.items(), key=lambda item: (order[item[0][0]], item[0][1])):
        array = np.asarray(values, dtype=np.float64)
        low, high = t_interval(array) if array.size >= min_pairs else (math.nan, math.nan)
        lost = failed[cell]
        out.append(
            Paired(
                arm=cell[0],
                n_labels=cell[1],
                pairs=int(array.size),
                mean_diff=float(array.mean()) if array.size else math.nan,
                sd_diff=float(array.std(ddof=1)) if array.size > 1 else math.nan,
                t_low=low,
                t_high=high,
                p_sign_flip=sign_flip_p(array, flips=flips, seed=seed),
                p_wilcoxon=wilcoxon_p(array),
                excluded=len(lost),
                arm_failed=sum(arm for arm, _ in lost),
                baseline_failed=sum(ref for _, ref in lost),
                sign_flip_exact=array.size <= EXACT_SIGN_FLIPS_MAX,
            )
        )
    flip_holm = holm([p.p_sign_flip for p in out])
    wilcoxon_holm = holm([p.p_wilcoxon for p in out])
    return [
        replace(p, p_sign_flip_holm=a, p_wilcoxon_holm=b) for p, a, b in zip(out, flip_holm, wilcoxon_holm, strict=True)
    ]


def delong_pairs(rows: list[dict[str, Any]], *, baseline: str = "random") -> list[DeLong]:
    """DeLong's paired AUROC test of each arm against `baseline` on the same encoder, label count and repeat,
    where both runs kept two-class per-case outputs on the same test set (same cases, same labels)."""
    several = len({row["encoder"] for row in rows}) > 1
    base = {
        (str(row["encoder"]), int(row["n_labels"]), int(row["repeat"])): row
        for row in rows
        if row["strategy"] == baseline
    }
    out = []
    for row in rows:
        key = (str(row["encoder"]), int(row["n_labels"]), int(row["repeat"]))
        ref = base.get(key)
        if row["strategy"] == baseline or ref is None or row.get("test_set") != ref.get("test_set"):
            continue
        mine, theirs = binary_scores(row.get("per_case") or {}), binary_scores(ref.get("per_case") or {})
        if mine is None or theirs is None or not np.array_equal(mine[1], theirs[1]):
            continue
        try:
            test = delong_test(mine[0], theirs[0], mine[1])
        except ValueError:  # fewer than two cases of a class: no variance to estimate
            continue
        out.append(
            DeLong(
                arm_name(row, several),
                key[1],
                key[2],
                test["auc_a"],
                test["auc_b"],
                test["diff"],
                test["se"],
                test["z"],
                test["p"],
            )
        )
    order = {arm: i for i, arm in enumerate(dict.fromkeys(d.arm for d in out))}
    return sorted(out, key=lambda d: (order[d.arm], d.n_labels, d.repeat))


def markdown_delong(tests: list[DeLong], baseline: str) -> str:
    """One row per arm and label count: the DeLong p of every repeat, and how many fall below 0.05."""
    cells: dict[tuple[str, int], list[DeLong]] = defaultdict(list)
    for d in tests:
        cells[(d.arm, d.n_labels)].append(d)
    lines = [
        f"| arm | n | ΔAUROC vs {baseline} per repeat | DeLong p per repeat | p < 0.05 |",
        "|---|---|---|---|---|",
    ]
    for (arm, n), group in cells.items():
        diffs = ", ".join(f"{d.diff:+.3f}" for d in group)
        ps = ", ".join(_fmt_p(d.p) for d in group)
        lines.append(f"| {arm} | {n} | {diffs} | {ps} | {sum(d.p < 0.05 for d in group)} of {len(group)} |")
    return "\n".join(lines)


def delong_notes(baseline: str) -> str:
    return "\n".join(
        [
            f"- DeLong p: two-sided test of AUROC(arm) = AUROC(`{baseline}`) on the same test cases (DeLong et al. "
            "1988, fast midrank algorithm of Sun & Xu 2014), one per repeat: whether sampling the test cases alone "
            "could explain the difference between these two trained models.",
            "- Per repeat, not combined: the repeats share one test set, so their p-values are not independent and "
            "no combination rule (Fisher, Stouffer) applies. Whether an arm helps across labeled subsets is the "
            "paired table's question.",
        ]
    )


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if not math.isfinite(value) else f"{value:.{digits}f}"


def _fmt_p(value: float) -> str:
    return "–" if not math.isfinite(value) else "<0.001" if value < 0.001 else f"{value:.3f}"


def summary_cell(s: Summary) -> str:
    """`mean (sd) [test-set interval]`, with `, failed k of n` when runs failed, so a reader sees what the mean
    leaves out."""
    text = f"{_fmt(s.mean)} ({_fmt(s.sd)})"
    if math.isfinite(s.test_low) and math.isfinite(s.test_high):
        text += f" [{_fmt(s.test_low)}, {_fmt(s.test_high)}]"
    return text if not s.failed else f"{text}, failed {s.failed} of {s.runs}"


def selection_text(summary: list[Summary]) -> str:
    """Which model-selection rule each cell used: one line per label count when all arms share it, else per arm."""
    lines = ["Model selection (the epoch whose weights were tested):"]
    for n in sorted({s.n_labels for s in summary}):
        rules = {s.arm: s.selection for s in summary if s.n_labels == n}
        if len(set(rules.values())) == 1:
            lines.append(f"- n={n}: {next(iter(rules.values()))}")
        else:
            lines.append(f"- n={n}: " + "; ".join(f"{arm}: {rule}" for arm, rule in rules.items()))
    return "\n".join(lines)


def markdown_table(summary: list[Summary], metric: str) -> str:
    """Arms as rows, label counts as columns, cells `mean (sd)` as few-label studies print them (with failures)."""
    counts = sorted({s.n_labels for s in summary})
    arms = list(dict.fromkeys(s.arm for s in summary))
    cell = {(s.arm, s.n_labels): s for s in summary}
    lines = [
        f"| {metric} | " + " | ".join(f"n={n}" for n in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for arm in arms:
        values = []
        for n in counts:
            s = cell.get((arm, n))
            values.append("" if s is None else summary_cell(s))
        lines.append(f"| {arm} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def interval_cell(p: Paired, min_pairs: int = MIN_PAIRS_FOR_INTERVAL) -> str:
    if p.pairs < min_pairs:
        return TOO_FEW_PAIRS
    return f"[{_fmt(p.t_low)}, {_fmt(p.t_high)}]"


def pairs_cell(p: Paired) -> str:
    """`6`, or `4 of 6 (2 excluded: arm failed 2, baseline failed 0)` when failed runs left pairs out."""
    if not p.excluded:
        return str(p.pairs)
    return (
        f"{p.pairs} of {p.pairs + p.excluded} ({p.excluded} excluded: arm failed {p.arm_failed}, "
        f"baseline failed {p.baseline_failed})"
    )


def markdown_paired(
    paired: list[Paired], metric: str, baseline: str, *, min_pairs: int = MIN_PAIRS_FOR_INTERVAL
) -> str:
    level = f"{INTERVAL_LEVEL:.0%}"
    lines = [
        f"| arm | n | Δ{metric} vs {baseline} | {level} t-interval | sign-flip p | Holm | Wilcoxon p | Holm | pairs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in paired:
        delta = "–" if not math.isfinite(p.mean_diff) else f"{p.mean_diff:+.3f}"
        lines.append(
            f"| {p.arm} | {p.n_labels} | {delta} | {interval_cell(p, min_pairs)} | {_fmt_p(p.p_sign_flip)} | "
            f"{_fmt_p(p.p_sign_flip_holm)} | {_fmt_p(p.p_wilcoxon)} | {_fmt_p(p.p_wilcoxon_holm)} | {pairs_cell(p)} |"
        )
    return "\n".join(lines)


def paired_notes(
    paired: list[Paired], metric: str, baseline: str, *, flips: int, seed: int, min_pairs: int = MIN_PAIRS_FOR_INTERVAL
) -> str:
    """What the paired columns mean and cannot show, under the table."""
    direction = "; lower is better" if metric in LOWER_IS_BETTER else ""
    monte_carlo = any(not p.sign_flip_exact for p in paired)
    flips_text = (
        f"; above, {flips} random sign flips (seed {seed}), the observed one counted in each tail"
        if monte_carlo
        else ""
    )
    lines = [
        f"- Δ: mean over repeats of ({metric} of the arm) − ({metric} of `{baseline}`) on the same labeled subset "
        f"and seed{direction}.",
        f"- {INTERVAL_LEVEL:.0%} t-interval: mean Δ ± t · sd(Δ) / √pairs with pairs − 1 degrees of freedom; "
        f'from {min_pairs} pairs on ("{TOO_FEW_PAIRS}" below).',
        f"- sign-flip p: two-sided permutation test of mean Δ, exact over all 2^pairs sign flips up to "
        f"{EXACT_SIGN_FLIPS_MAX} pairs{flips_text}. With n pairs it cannot go below 2 / 2^n (0.25 at 3 pairs).",
        "- Wilcoxon p: two-sided signed-rank test (scipy; exact without ties or zero differences).",
        f"- Holm: each p column adjusted (Holm step-down) across the {len(paired)} comparisons of this report "
        "(those with no p in that column left out).",
        f"- pairs: pairs used. A run whose {metric} is not finite (e.g. HD95 of an empty prediction) has failed: its "
        "pair is left out of Δ, the interval and both p-values, and counted here (arm or baseline side). Leaving "
        "it out favours the side that failed, so read such a row with its failure count.",
    ]
    return "\n".join(lines)


def plot_learning_curves(summary: list[Summary], metric: str, path: str | Path, title: str | None = None) -> Path:
    """Metric against labeled cases, one line per arm with a ±1 sd band (matplotlib Agg, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    arms = list(dict.fromkeys(s.arm for s in summary))
    fig, ax = plt.subplots(figsize=(7.6 if len(arms) > 4 else 6.4, 4.2), dpi=120)
    # Many overlapping bands turn to mud: fainter bands the more arms share the plot.
    alpha = 0.15 if len(arms) <= 3 else 0.06
    for arm in arms:
        points = sorted((s for s in summary if s.arm == arm), key=lambda s: s.n_labels)
        x = np.array([s.n_labels for s in points], dtype=float)
        mean = np.array([s.mean for s in points])
        sd = np.nan_to_num(np.array([s.sd for s in points]))
        (line,) = ax.plot(x, mean, marker="o", label=arm)
        ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=alpha, linewidth=0)
    counts = sorted({s.n_labels for s in summary})
    # Label counts grow by factors (5, 10, 20, 50, ...): a log axis spaces them evenly.
    ax.set_xscale("log")
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.minorticks_off()
    ax.set_xlabel("labeled cases")
    ax.set_ylabel(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
    ax.set_title(title or f"{metric} vs labeled cases (mean ± sd over repeats)")
    ax.grid(alpha=0.3)
    if len(arms) > 4:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(
    results: str | Path,
    out_dir: str | Path | None = None,
    *,
    metric: str | None = None,
    baseline: str = "random",
    flips: int = DEFAULT_SIGN_FLIPS,
    seed: int = 0,
    min_pairs: int = MIN_PAIRS_FOR_INTERVAL,
    resamples: int = DEFAULT_RESAMPLES,
) -> ReportFiles:
    """Write report.md, summary.csv, paired.csv, learning_curve.png and, for AUROC, delong.csv.

    `flips` and `seed` drive the Monte-Carlo sign-flip p of comparisons with more than EXACT_SIGN_FLIPS_MAX
    pairs; `resamples` and `seed` the patient-level test-set bootstrap; `min_pairs` is the fewest pairs that get
    a t-interval. The columns are SUMMARY_COLUMNS, PAIRED_COLUMNS and DELONG_COLUMNS (see `Summary`, `Paired`
    and `DeLong`).
    """
    if flips < 1:
        raise ConfigError(f"flips must be >= 1, got {flips}; e.g. --flips 100000")
    if resamples < 1:
        raise ConfigError(f"resamples must be >= 1, got {resamples}; e.g. --resamples 2000")
    if min_pairs < 2:
        raise ConfigError(f"an interval needs at least 2 pairs, got min_pairs={min_pairs}")
    rows = [row for row in read_results(results) if row.get("status", "ok") == "ok"]
    if not rows:
        raise ConfigError(f"{results} holds no finished runs")
    metric = pick_metric(rows, metric)
    strategies = sorted({str(row.get("strategy")) for row in rows})
    if baseline != "random" and baseline not in strategies:  # named on purpose (random is the default)
        raise ConfigError(
            f"baseline '{baseline}' has no runs in the results.{did_you_mean(baseline, strategies)} "
            f"Strategies there: {', '.join(strategies)}"
        )
    results_path = Path(results)
    out = Path(out_dir) if out_dir is not None else (results_path if results_path.is_dir() else results_path.parent)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows, metric, resamples=resamples, seed=seed)
    paired = paired_differences(rows, metric, baseline=baseline, flips=flips, seed=seed, min_pairs=min_pairs)

    summary_csv = out / "summary.csv"
    with summary_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SUMMARY_COLUMNS)
        for s in summary:
            writer.writerow(
                [s.arm, s.n_labels, metric, s.mean, s.sd, s.runs, s.failed, s.test_low, s.test_high, s.selection]
            )
    paired_csv = out / "paired.csv"
    with paired_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PAIRED_COLUMNS)
        for p in paired:
            writer.writerow(
                [
                    p.arm,
                    baseline,
                    p.n_labels,
                    metric,
                    p.pairs,
                    p.excluded,
                    p.arm_failed,
                    p.baseline_failed,
                    p.mean_diff,
                    p.sd_diff,
                    p.t_low,
                    p.t_high,
                    p.p_sign_flip,
                    p.p_sign_flip_holm,
                    "exact" if p.sign_flip_exact else f"monte-carlo {flips}",
                    p.p_wilcoxon,
                    p.p_wilcoxon_holm,
                ]
            )
    tests = delong_pairs(rows, baseline=baseline) if metric == "auroc" else []
    delong_csv = None
    if tests:
        delong_csv = out / "delong.csv"
        with delong_csv.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(DELONG_COLUMNS)
            for d in tests:
                writer.writerow(
                    [d.arm, baseline, d.n_labels, d.repeat, d.auroc_arm, d.auroc_baseline, d.diff, d.se, d.z, d.p]
                )
    plot = plot_learning_curves(summary, metric, out / "learning_curve.png")

    intervals = any(math.isfinite(s.test_low) for s in summary)
    if intervals:
        parts = [
            f"### {metric}: mean (sd) over repeats [{INTERVAL_LEVEL:.0%} test-set interval]\n",
            markdown_table(summary, metric),
            "",
            f"[low, high]: {INTERVAL_LEVEL:.0%} percentile interval of the cell's mean over {resamples} patient-level "
            f"bootstrap resamples of the test set (seed {seed}; each resample recomputes every run's {metric} from "
            "its per-case outputs). It shows how much one test set can move the score, not how much another "
            "labeled subset would (that is the sd); absent where a run kept no per-case outputs.",
        ]
    else:
        parts = [
            f"### {metric}: mean (sd) over repeats\n",
            markdown_table(summary, metric),
            "",
            "(no test-set intervals: these results hold no per-case outputs)",
        ]
    if any(s.failed for s in summary):
        parts.append(
            f"\nfailed k of n: k of the cell's n runs gave no finite {metric} (e.g. HD95 of an empty prediction); "
            "the mean and sd are over the other runs."
        )
    parts += ["", selection_text(summary)]
    if paired:
        parts += [
            f"\n### Paired differences against `{baseline}` (same labeled subset and seed)\n",
            markdown_paired(paired, metric, baseline, min_pairs=min_pairs),
            "",
            paired_notes(paired, metric, baseline, flips=flips, seed=seed, min_pairs=min_pairs),
        ]
    else:
        parts.append(f"\n(no `{baseline}` runs to pair against)")
    if tests:
        parts += [
            f"\n### DeLong's test against `{baseline}` (same test set, per repeat)\n",
            markdown_delong(tests, baseline),
            "",
            delong_notes(baseline),
        ]
    elif metric == "auroc":
        parts.append(
            f"\n(no DeLong test: it needs runs of an arm and `{baseline}` with two-class per-case outputs on the "
            "same test set)"
        )
    markdown = out / "report.md"
    markdown.write_text("\n".join(parts) + "\n")
    return ReportFiles(markdown, summary_csv, paired_csv, plot, delong_csv)
