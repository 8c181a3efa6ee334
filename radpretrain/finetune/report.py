"""results.jsonl -> mean (sd) tables, paired differences against a baseline, and learning-curve plots."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radpretrain.errors import ConfigError
from radpretrain.registry import did_you_mean

#: Metrics in the order a report picks its default from; all but hd95 are higher-is-better.
METRIC_PREFERENCE = ("dice", "auroc", "balanced_accuracy", "accuracy", "iou")
LOWER_IS_BETTER = frozenset({"hd95", "loss"})


@dataclass(frozen=True)
class Summary:
    """Mean and sample sd (ddof=1) of one metric over the repeats of one arm and label count."""

    arm: str
    n_labels: int
    mean: float
    sd: float
    runs: int


@dataclass(frozen=True)
class Paired:
    """An arm minus the baseline, paired by encoder, label count and repeat (the same labeled subset)."""

    arm: str
    n_labels: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_wilcoxon: float
    pairs: int


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    summary_csv: Path
    paired_csv: Path
    plot: Path


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


def summarize(rows: list[dict[str, Any]], metric: str) -> list[Summary]:
    """Mean (sd) per arm and label count; non-finite values (e.g. HD95 of an empty mask) are left out."""
    several = len({row["encoder"] for row in rows}) > 1
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for row in rows:
        value = row["metrics"].get(metric)
        key = (arm_name(row, several), int(row["n_labels"]))
        groups.setdefault(key, [])
        if value is not None and math.isfinite(value):
            groups[key].append(float(value))
    out = []
    # Arms in the order the sweep ran them (its `strategies` list), label counts ascending.
    order = {arm: i for i, arm in enumerate(dict.fromkeys(arm for arm, _ in groups))}
    for (arm, n), values in sorted(groups.items(), key=lambda item: (order[item[0][0]], item[0][1])):
        mean = float(np.mean(values)) if values else math.nan
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        out.append(Summary(arm, n, mean, sd, len(values)))
    return out


def bootstrap_ci(diffs: np.ndarray, *, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of paired differences (pairs resampled); NaN
    for fewer than two pairs."""
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.size < 2:
        return math.nan, math.nan  # one pair says nothing about spread
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, diffs.size, size=(n_boot, diffs.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value (scipy; exact for small samples), NaN when undefined."""
    from scipy.stats import wilcoxon

    diffs = np.asarray(diffs, dtype=np.float64)
    if np.count_nonzero(diffs) == 0:
        return math.nan
    return float(wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_differences(
    rows: list[dict[str, Any]], metric: str, *, baseline: str = "random", n_boot: int = 10000, seed: int = 0
) -> list[Paired]:
    """Each arm minus `baseline` on the same encoder, label count and repeat (so the same labeled subset)."""
    several = len({row["encoder"] for row in rows}) > 1
    base: dict[tuple[str, int, int], float] = {}
    for row in rows:
        if row["strategy"] == baseline:
            base[(str(row["encoder"]), int(row["n_labels"]), int(row["repeat"]))] = row["metrics"].get(metric)
    if not base:
        return []
    diffs: dict[tuple[str, int], list[float]] = defaultdict(list)
    for row in rows:
        if row["strategy"] == baseline:
            continue
        ref = base.get((str(row["encoder"]), int(row["n_labels"]), int(row["repeat"])))
        value = row["metrics"].get(metric)
        if ref is None or value is None or not (math.isfinite(ref) and math.isfinite(value)):
            continue
        diffs[(arm_name(row, several), int(row["n_labels"]))].append(float(value) - float(ref))
    out = []
    order = {arm: i for i, arm in enumerate(dict.fromkeys(arm for arm, _ in diffs))}
    for (arm, n), values in sorted(diffs.items(), key=lambda item: (order[item[0][0]], item[0][1])):
        array = np.asarray(values)
        low, high = bootstrap_ci(array, n_boot=n_boot, seed=seed)
        out.append(Paired(arm, n, float(array.mean()), low, high, wilcoxon_p(array), array.size))
    return out


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_table(summary: list[Summary], metric: str) -> str:
    """Arms as rows, label counts as columns, cells `mean (sd)` as few-label studies print them."""
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
            values.append("" if s is None else f"{_fmt(s.mean)} ({_fmt(s.sd)})")
        lines.append(f"| {arm} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def markdown_paired(paired: list[Paired], metric: str, baseline: str) -> str:
    lines = [
        f"| arm | n | Δ{metric} vs {baseline} | 95% bootstrap CI | Wilcoxon p | pairs |",
        "|---|---|---|---|---|---|",
    ]
    for p in paired:
        lines.append(
            f"| {p.arm} | {p.n_labels} | {p.mean_diff:+.3f} | [{_fmt(p.ci_low)}, {_fmt(p.ci_high)}] | "
            f"{_fmt(p.p_wilcoxon)} | {p.pairs} |"
        )
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
    if len(counts) > 1 and counts[-1] / counts[0] >= 8:
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
    n_boot: int = 10000,
    seed: int = 0,
) -> ReportFiles:
    """Write report.md, summary.csv, paired.csv and learning_curve.png for a sweep's results."""
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
    summary = summarize(rows, metric)
    paired = paired_differences(rows, metric, baseline=baseline, n_boot=n_boot, seed=seed)

    summary_csv = out / "summary.csv"
    with summary_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arm", "n_labels", "metric", "mean", "sd", "runs"])
        for s in summary:
            writer.writerow([s.arm, s.n_labels, metric, s.mean, s.sd, s.runs])
    paired_csv = out / "paired.csv"
    with paired_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arm", "baseline", "n_labels", "metric", "mean_diff", "ci_low", "ci_high", "p", "pairs"])
        for p in paired:
            writer.writerow(
                [p.arm, baseline, p.n_labels, metric, p.mean_diff, p.ci_low, p.ci_high, p.p_wilcoxon, p.pairs]
            )
    plot = plot_learning_curves(summary, metric, out / "learning_curve.png")

    parts = [f"### {metric}: mean (sd) over repeats\n", markdown_table(summary, metric)]
    if paired:
        parts += [
            f"\n### Paired differences against `{baseline}` (same labeled subset; {n_boot} bootstrap resamples)\n",
            markdown_paired(paired, metric, baseline),
        ]
    else:
        parts.append(f"\n(no `{baseline}` runs to pair against)")
    markdown = out / "report.md"
    markdown.write_text("\n".join(parts) + "\n")
    return ReportFiles(markdown, summary_csv, paired_csv, plot)
