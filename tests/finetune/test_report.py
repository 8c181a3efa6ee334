"""The report's statistics against hand-computed values on a small fixed results file."""

from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pytest

from radpretrain.cli import main
from radpretrain.errors import ConfigError
from radpretrain.finetune import report

# Dice per repeat (0..4); each repeat of `full` is paired with the same repeat of `random`.
VALUES = {
    ("random", 5): [0.50, 0.60, 0.55, 0.45, 0.40],
    ("full", 5): [0.60, 0.72, 0.61, 0.58, 0.49],  # diffs .10 .12 .06 .13 .09: all positive
    ("random", 10): [0.70, 0.65, 0.72, 0.68, 0.75],
    ("full", 10): [0.69, 0.70, 0.74, 0.71, 0.71],  # diffs -.01 .05 .02 .03 -.04: ranks 1..5, W- = 1 + 4
}


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "results.jsonl"
    with path.open("w") as handle:
        for (strategy, n), values in VALUES.items():
            for repeat, value in enumerate(values):
                row = {
                    "cell": f"enc|{strategy}|n{n}|r{repeat}",
                    "encoder": "runs/enc",
                    "strategy": strategy,
                    "n_labels": n,
                    "repeat": repeat,
                    "status": "ok",
                    "metrics": {"dice": value, "hd95": math.nan if repeat == 0 else 3.0 + repeat},
                }
                handle.write(json.dumps(row) + "\n")
    return path


def exact_wilcoxon_two_sided(diffs: list[float]) -> float:
    """Slow, obvious reference: enumerate all 2^n sign patterns of the ranks (no ties, no zeros)."""
    ranks = np.argsort(np.argsort(np.abs(diffs))) + 1
    w_minus = sum(r for r, d in zip(ranks, diffs, strict=True) if d < 0)
    stats = [
        sum(r for r, s in zip(ranks, signs, strict=True) if s) for signs in itertools.product([0, 1], repeat=len(diffs))
    ]
    low = min(w_minus, ranks.sum() - w_minus)
    return min(1.0, 2 * sum(s <= low for s in stats) / len(stats))


def test_means_and_sds_match_hand_computation(results):
    rows = report.read_results(results)
    summary = {(s.arm, s.n_labels): s for s in report.summarize(rows, "dice")}
    # random n=5: deviations 0, .1, .05, -.05, -.1 -> sum of squares .025 / 4.
    assert summary[("random", 5)].mean == pytest.approx(0.50)
    assert summary[("random", 5)].sd == pytest.approx(math.sqrt(0.025 / 4))
    # full n=5: deviations 0, .12, .01, -.02, -.11 -> .027 / 4.
    assert summary[("full", 5)].mean == pytest.approx(0.60)
    assert summary[("full", 5)].sd == pytest.approx(math.sqrt(0.027 / 4))
    assert summary[("full", 10)].runs == 5
    # Non-finite values (HD95 of an empty prediction) are left out of the mean, not propagated.
    hd = {(s.arm, s.n_labels): s for s in report.summarize(rows, "hd95")}
    assert hd[("random", 5)].runs == 4
    assert hd[("random", 5)].mean == pytest.approx(np.mean([4, 5, 6, 7]))


def test_paired_differences_and_wilcoxon_match_hand_computation(results):
    rows = report.read_results(results)
    paired = {(p.arm, p.n_labels): p for p in report.paired_differences(rows, "dice", n_boot=2000, seed=1)}
    assert set(paired) == {("full", 5), ("full", 10)}
    five, ten = paired[("full", 5)], paired[("full", 10)]
    assert five.pairs == 5 and five.mean_diff == pytest.approx(0.10)
    assert ten.mean_diff == pytest.approx(0.01)
    # All five differences positive: exact two-sided p = 2 / 2^5.
    assert five.p_wilcoxon == pytest.approx(2 / 32)
    # W- = 5 for n = 5: 10 of 32 sign patterns have a sum <= 5, so p = 20 / 32.
    assert ten.p_wilcoxon == pytest.approx(20 / 32)
    for diffs, p in (([0.10, 0.12, 0.06, 0.13, 0.09], five), ([-0.01, 0.05, 0.02, 0.03, -0.04], ten)):
        assert p.p_wilcoxon == pytest.approx(exact_wilcoxon_two_sided(diffs))
        # A bootstrap mean lies between the smallest and largest difference, around the observed mean.
        assert min(diffs) - 1e-12 <= p.ci_low <= p.mean_diff <= p.ci_high <= max(diffs) + 1e-12


def test_bootstrap_ci_is_seeded_and_covers_the_true_difference():
    rng = np.random.default_rng(7)
    diffs = 0.1 + rng.normal(0.0, 0.05, size=40)
    low, high = report.bootstrap_ci(diffs, n_boot=4000, seed=3)
    assert (low, high) == report.bootstrap_ci(diffs, n_boot=4000, seed=3)
    assert (low, high) != report.bootstrap_ci(diffs, n_boot=4000, seed=4)
    # Over many simulated studies a 95% interval covers the true difference about 95% of the time.
    covered = []
    for _ in range(300):
        sample = 0.1 + rng.normal(0.0, 0.05, size=30)
        lo, hi = report.bootstrap_ci(sample, n_boot=1000, seed=0)
        covered.append(lo < 0.1 < hi)
    assert 0.88 <= np.mean(covered) <= 0.99
    # About the normal-theory width 2 * 1.96 * sd / sqrt(n).
    assert high - low == pytest.approx(2 * 1.96 * diffs.std(ddof=1) / math.sqrt(40), rel=0.2)
    assert report.bootstrap_ci(np.full(6, 0.25), n_boot=100) == (pytest.approx(0.25), pytest.approx(0.25))
    assert math.isnan(report.wilcoxon_p(np.zeros(4)))
    assert all(math.isnan(v) for v in report.bootstrap_ci(np.array([0.3])))


def test_report_files_and_cli(results, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(results), "--out", str(out), "--boot", "500"]) == 0
    markdown = (out / "report.md").read_text()
    assert "| full | 0.600 (0.082) | 0.710 (0.019) |" in markdown
    assert "| full | 5 | +0.100 |" in markdown
    with (out / "summary.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert {(r["arm"], r["n_labels"]) for r in table} == {(s, str(n)) for s, n in VALUES}
    png = (out / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "report.md" in capsys.readouterr().out


def test_bad_inputs_give_clear_errors(tmp_path, results):
    with pytest.raises(ConfigError, match="results file not found"):
        report.read_results(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="metric 'auc' is not in the results; available: dice, hd95"):
        report.write_report(results, tmp_path / "x", metric="auc")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        report.read_results(broken)
    assert main(["report", str(tmp_path / "nope.jsonl")]) == 2
