"""The report's statistics against hand-computed values, scipy and a textbook Holm example."""

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


def exact_sign_flip_two_sided(diffs: list[float]) -> float:
    """Slow, obvious reference: every sign pattern, counted when its |sum| reaches the observed |sum|."""
    observed = abs(sum(diffs))
    sums = [
        abs(sum(s * d for s, d in zip(signs, diffs, strict=True)))
        for signs in itertools.product([1, -1], repeat=len(diffs))
    ]
    return sum(v >= observed - 1e-12 for v in sums) / len(sums)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def row(strategy, n, repeat, **metrics):
    return {"cell": f"e|{strategy}|n{n}|r{repeat}", "encoder": "e", "strategy": strategy, "n_labels": n} | {
        "repeat": repeat,
        "status": "ok",
        "metrics": metrics,
    }


def test_means_and_sds_match_hand_computation(results):
    rows = report.read_results(results)
    summary = {(s.arm, s.n_labels): s for s in report.summarize(rows, "dice")}
    # random n=5: deviations 0, .1, .05, -.05, -.1 -> sum of squares .025 / 4.
    assert summary[("random", 5)].mean == pytest.approx(0.50)
    assert summary[("random", 5)].sd == pytest.approx(math.sqrt(0.025 / 4))
    # full n=5: deviations 0, .12, .01, -.02, -.11 -> .027 / 4.
    assert summary[("full", 5)].mean == pytest.approx(0.60)
    assert summary[("full", 5)].sd == pytest.approx(math.sqrt(0.027 / 4))
    assert summary[("full", 10)].runs == 5 and summary[("full", 10)].failed == 0
    # A non-finite value (HD95 of an empty prediction) is counted as a failed run, and the mean is over the rest.
    hd = {(s.arm, s.n_labels): s for s in report.summarize(rows, "hd95")}
    assert hd[("random", 5)].runs == 5 and hd[("random", 5)].failed == 1
    assert hd[("random", 5)].mean == pytest.approx(np.mean([4, 5, 6, 7]))
    assert report.summary_cell(hd[("random", 5)]).endswith(", failed 1 of 5")
    assert report.summary_cell(summary[("full", 5)]) == "0.600 (0.082)"


def test_inf_missing_and_non_numbers_count_as_failed(tmp_path):
    rows = [
        row("random", 5, 0, hd95=math.inf),
        row("random", 5, 1, hd95=-math.inf),
        row("random", 5, 2),
        row("random", 5, 3, hd95=None),
        row("random", 5, 4, hd95="n/a"),
        row("random", 5, 5, hd95=2.0),
    ]
    rows = report.read_results(write_rows(tmp_path / "results.jsonl", rows))  # inf survives the JSON round trip
    (cell,) = report.summarize(rows, "hd95")
    assert (cell.runs, cell.failed, cell.mean) == (6, 5, 2.0)


def test_paired_differences_and_p_values_match_hand_computation(results):
    rows = report.read_results(results)
    paired = {(p.arm, p.n_labels): p for p in report.paired_differences(rows, "dice", flips=2000, seed=1)}
    assert set(paired) == {("full", 5), ("full", 10)}
    five, ten = paired[("full", 5)], paired[("full", 10)]
    assert five.pairs == 5 and five.mean_diff == pytest.approx(0.10) and five.excluded == 0
    assert ten.mean_diff == pytest.approx(0.01)
    # All five differences positive: exact two-sided p = 2 / 2^5 for both tests.
    assert five.p_wilcoxon == pytest.approx(2 / 32)
    assert five.p_sign_flip == pytest.approx(2 / 32)
    # W- = 5 for n = 5: 10 of 32 sign patterns have a sum <= 5, so p = 20 / 32.
    assert ten.p_wilcoxon == pytest.approx(20 / 32)
    for diffs, p in (([0.10, 0.12, 0.06, 0.13, 0.09], five), ([-0.01, 0.05, 0.02, 0.03, -0.04], ten)):
        assert p.p_wilcoxon == pytest.approx(exact_wilcoxon_two_sided(diffs))
        assert p.p_sign_flip == pytest.approx(exact_sign_flip_two_sided(diffs))
        assert p.sd_diff == pytest.approx(np.std(diffs, ddof=1))
        # Five pairs are too few for an interval.
        assert math.isnan(p.t_low) and math.isnan(p.t_high)
        assert report.interval_cell(p) == "too few pairs for an interval"
    # From five pairs on when asked: then it is the t-interval of the differences.
    (wide,) = [p for p in report.paired_differences(rows, "dice", min_pairs=5) if p.n_labels == 5]
    assert (wide.t_low, wide.t_high) == pytest.approx(report.t_interval([0.10, 0.12, 0.06, 0.13, 0.09]))
    # Holm across the two comparisons of the report: 2 * 0.0625 = 0.125, then max(0.125, 0.625) = 0.625.
    assert five.p_sign_flip_holm == pytest.approx(2 * five.p_sign_flip)
    assert ten.p_sign_flip_holm == pytest.approx(max(2 * five.p_sign_flip, ten.p_sign_flip))
    assert five.p_wilcoxon_holm == pytest.approx(0.125) and ten.p_wilcoxon_holm == pytest.approx(0.625)


def test_t_interval_matches_scipy():
    from scipy import stats

    rng = np.random.default_rng(11)
    for n in (2, 6, 9, 30):
        diffs = 0.05 + rng.normal(0.0, 0.1, size=n)
        low, high = report.t_interval(diffs)
        reference = stats.t.interval(0.95, df=n - 1, loc=diffs.mean(), scale=stats.sem(diffs))
        assert (low, high) == pytest.approx(reference, rel=1e-12)
        ci = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
        assert (low, high) == pytest.approx((ci.low, ci.high), rel=1e-12)
    assert report.t_interval([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2))
    assert all(math.isnan(v) for v in report.t_interval([0.3]))


def test_t_interval_covers_the_truth_95_percent_of_the_time_at_six_pairs():
    rng = np.random.default_rng(5)
    covered = []
    for _ in range(4000):
        low, high = report.t_interval(0.1 + rng.normal(0.0, 0.05, size=6))
        covered.append(low < 0.1 < high)
    assert 0.94 <= np.mean(covered) <= 0.96


def test_sign_flip_p_on_hand_computed_samples():
    # [1, 2, 3]: sums over the 8 sign patterns are ±6, ±4, ±2, 0, 0; |sum| >= 6 twice.
    assert report.sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    # [1, -2, 3]: observed 2; |sums| are 6, 0, 2, 4, 4, 2, 0, 6 -> 6 of 8 reach it.
    assert report.sign_flip_p([1.0, -2.0, 3.0]) == pytest.approx(6 / 8)
    assert report.sign_flip_p([0.5]) == 1.0
    assert report.sign_flip_p([0.0, 0.0, 0.0]) == 1.0
    assert math.isnan(report.sign_flip_p([]))
    # Ties in |sum| that differ only by floating-point rounding still count as reaching it.
    assert report.sign_flip_p([0.1, 0.2, -0.3, 0.3]) == pytest.approx(exact_sign_flip_two_sided([0.1, 0.2, -0.3, 0.3]))
    rng = np.random.default_rng(3)
    for n in (4, 7, 10):
        diffs = list(rng.normal(0.02, 0.05, size=n))
        assert report.sign_flip_p(diffs) == pytest.approx(exact_sign_flip_two_sided(diffs))


def test_sign_flip_p_agrees_with_scipy_permutation_test():
    from scipy import stats

    diffs = np.random.default_rng(8).normal(0.03, 0.05, size=12)
    reference = stats.permutation_test(
        (diffs,), np.mean, permutation_type="samples", n_resamples=np.inf, alternative="two-sided"
    )
    assert report.sign_flip_p(diffs) == pytest.approx(reference.pvalue)


def test_sign_flip_p_is_exact_up_to_20_pairs_and_a_seeded_monte_carlo_above():
    rng = np.random.default_rng(2)
    twenty = rng.normal(0.01, 0.05, size=20)
    p20 = report.sign_flip_p(twenty, flips=10)  # exact: the flips are not used
    assert p20 * 2**20 == pytest.approx(round(p20 * 2**20))
    many = rng.normal(0.01, 0.05, size=22)
    exact = report.sign_flip_p(many, exact_max=22)
    estimate = report.sign_flip_p(many, flips=20000, seed=0)
    assert estimate * 20001 == pytest.approx(round(estimate * 20001))  # 2 (hits + 1) / (flips + 1)
    assert estimate == report.sign_flip_p(many, flips=20000, seed=0)
    assert estimate != report.sign_flip_p(many, flips=20000, seed=1)
    assert abs(estimate - exact) < 4 * math.sqrt(exact * (1 - exact) / 20000) + 1 / 20000
    # A Monte-Carlo p is never 0, however extreme the data.
    assert report.sign_flip_p(np.full(40, 1.0), flips=1000) == pytest.approx(2 / 1001)  # both tails, hits 0


def test_holm_on_the_textbook_example():
    # Holm (1979) as Wikipedia's "Holm-Bonferroni method" works it: four hypotheses, alpha 0.05,
    # p = 0.01, 0.04, 0.03, 0.005 -> H4 and H1 rejected; adjusted 4 * .005, 3 * .01, 2 * .03, max(.06, .04).
    assert report.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # Untested comparisons (NaN) stay NaN and do not count in m; adjusted values are capped at 1.
    adjusted = report.holm([0.01, math.nan, 0.04])
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert report.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])
    assert report.holm([]) == []


def test_failed_runs_are_counted_in_pairs_not_dropped_silently(tmp_path, results):
    rows = report.read_results(results)
    # hd95 failed in repeat 0 of both arms: that pair is excluded and both sides are counted.
    hd = {(p.arm, p.n_labels): p for p in report.paired_differences(rows, "hd95")}
    five = hd[("full", 5)]
    assert (five.pairs, five.excluded, five.arm_failed, five.baseline_failed) == (4, 1, 1, 1)
    assert report.pairs_cell(five) == "4 of 5 (1 excluded: arm failed 1, baseline failed 1)"
    # Only the arm fails in two of six repeats: its mean leaves them out, the table says so, the pairs too.
    rows = [row("random", 6, r, dice=0.5 + 0.01 * r) for r in range(6)]
    rows += [row("empty", 6, r, dice=math.nan if r < 2 else 0.6 + 0.01 * r) for r in range(6)]
    (cell,) = report.paired_differences(rows, "dice")
    assert (cell.pairs, cell.excluded, cell.arm_failed, cell.baseline_failed) == (4, 2, 2, 0)
    assert cell.mean_diff == pytest.approx(0.1)
    assert report.interval_cell(cell) == "too few pairs for an interval"  # 4 usable pairs of 6
    out = report.write_report(write_rows(tmp_path / "r.jsonl", rows), tmp_path / "rep")
    markdown = out.markdown.read_text()
    assert "| empty | 0.635 (0.013), failed 2 of 6 |" in markdown
    assert "4 of 6 (2 excluded: arm failed 2, baseline failed 0)" in markdown
    # A cell whose every pair failed still has its row.
    rows = [row("random", 6, r, hd95=1.0) for r in range(3)] + [row("empty", 6, r, hd95=math.nan) for r in range(3)]
    (cell,) = report.paired_differences(rows, "hd95")
    assert (cell.pairs, cell.excluded) == (0, 3) and math.isnan(cell.mean_diff) and math.isnan(cell.p_sign_flip)


def test_six_pairs_get_an_interval_and_the_csv_columns(tmp_path):
    rng = np.random.default_rng(4)
    rows = []
    for arm, shift in (("random", 0.0), ("full", 0.08), ("frozen", 0.01)):
        rows += [row(arm, 10, r, dice=0.6 + shift + 0.01 * r + rng.normal(0, 0.02)) for r in range(6)]
    out = report.write_report(write_rows(tmp_path / "results.jsonl", rows), tmp_path / "rep")
    with out.paired_csv.open() as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == report.PAIRED_COLUMNS
    by_arm = {r["arm"]: r for r in table}
    diffs = [b["metrics"]["dice"] - a["metrics"]["dice"] for a, b in zip(rows[:6], rows[6:12], strict=True)]
    low, high = report.t_interval(diffs)
    assert (float(by_arm["full"]["t_low"]), float(by_arm["full"]["t_high"])) == pytest.approx((low, high))
    assert by_arm["full"]["sign_flip"] == "exact" and by_arm["full"]["pairs"] == "6"
    raw = [float(by_arm[a]["p_sign_flip"]) for a in ("full", "frozen")]
    assert [float(by_arm[a]["p_sign_flip_holm"]) for a in ("full", "frozen")] == pytest.approx(report.holm(raw))
    markdown = out.markdown.read_text()
    assert f"| full | 10 | {np.mean(diffs):+.3f} | [{low:.3f}, {high:.3f}] | 0.031 | 0.062 |" in markdown
    assert "too few pairs" not in markdown.split("\n- ")[0]
    with out.summary_csv.open() as handle:
        assert tuple(next(csv.reader(handle))) == report.SUMMARY_COLUMNS


def test_report_files_and_cli(results, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(results), "--out", str(out), "--flips", "500"]) == 0
    markdown = (out / "report.md").read_text()
    assert "| full | 0.600 (0.082) | 0.710 (0.019) |" in markdown
    assert "| full | 5 | +0.100 | too few pairs for an interval | 0.062 | 0.125 | 0.062 | 0.125 | 5 |" in markdown
    assert "bootstrap" not in markdown
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


def seg_row(strategy, n, repeat, dice_per_case, patients, **extra):
    """A result row with per-case outputs, its dice the mean over cases as the run writes it."""
    return row(strategy, n, repeat, dice=float(np.mean(dice_per_case))) | {
        "test_set": "t0",
        "per_case": {"patients": patients, "dice": list(dice_per_case)},
        **extra,
    }


def test_test_set_intervals_beside_mean_and_sd(tmp_path):
    rng = np.random.default_rng(7)
    patients = np.repeat(np.arange(10), 2).tolist()
    rows = []
    for strategy, level in (("random", 0.5), ("full", 0.7)):
        for repeat in range(3):
            rows.append(
                seg_row(
                    strategy,
                    10,
                    repeat,
                    np.clip(level + rng.normal(0, 0.15, 20), 0, 1).tolist(),
                    patients,
                    selection="fixed schedule (n < 30)",
                )
            )
    rows.append(row("random", 40, 0, dice=0.8) | {"selection": "best val epoch"})  # made before per-case outputs
    out = report.write_report(write_rows(tmp_path / "results.jsonl", rows), tmp_path / "rep", resamples=1000, seed=2)
    summary = {(s.arm, s.n_labels): s for s in report.summarize(rows, "dice", resamples=1000, seed=2)}
    full = summary[("full", 10)]
    # Reference: the same patient resamples, each run's dice recomputed, averaged over the cell's runs.
    from radpretrain.finetune.uncertainty import patient_weights

    weights = patient_weights(patients, 1000, seed=2)
    means = np.mean([weights @ np.array(r["per_case"]["dice"]) / weights.sum(1) for r in rows[3:6]], axis=0)
    assert (full.test_low, full.test_high) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert full.test_low < full.mean < full.test_high
    assert math.isnan(summary[("random", 40)].test_low)
    with out.summary_csv.open() as handle:
        table = {(r["arm"], r["n_labels"]): r for r in csv.DictReader(handle)}
    assert float(table[("full", "10")]["test_low"]) == pytest.approx(full.test_low)
    assert table[("full", "10")]["selection"] == "fixed schedule (n < 30)"
    assert table[("random", "40")]["selection"] == "best val epoch" and table[("random", "40")]["test_low"] == "nan"
    markdown = out.markdown.read_text()
    assert f"| full | {full.mean:.3f} ({full.sd:.3f}) [{full.test_low:.3f}, {full.test_high:.3f}] |" in markdown
    assert "patient-level bootstrap resamples of the test set (seed 2" in markdown
    assert "- n=10: fixed schedule (n < 30)\n- n=40: best val epoch" in markdown


def test_selection_rules_that_differ_between_arms_are_named_per_arm():
    rows = [row("random", 10, 0, dice=0.5) | {"selection": "fixed schedule (n < 30)"}]
    rows.append(row("weak-only", 10, 0, dice=0.6) | {"selection": "best val epoch"})
    rows.append(row("full", 10, 0, dice=0.6))  # an old row: no rule recorded
    text = report.selection_text(report.summarize(rows, "dice"))
    assert "n=10: random: fixed schedule (n < 30); weak-only: best val epoch; full: not recorded" in text


def cls_row(strategy, repeat, logits, labels):
    from radpretrain.finetune.uncertainty import weighted_metric

    per_case = {"patients": list(range(len(labels))), "labels": labels, "logits": logits}
    auroc = float(weighted_metric(per_case, "auroc", np.ones(len(labels)))[0])
    return row(strategy, 10, repeat, auroc=auroc) | {"test_set": "t1", "per_case": per_case}


def test_delong_per_repeat_against_the_baseline(tmp_path):
    from radpretrain.finetune.uncertainty import delong_test

    rng = np.random.default_rng(3)
    labels = (rng.random(60) < 0.5).astype(int).tolist()
    rows = []
    for repeat in range(3):
        for strategy, signal in (("random", 0.3), ("full", 2.0)):
            score = signal * np.array(labels) + rng.normal(0, 1, 60)
            rows.append(cls_row(strategy, repeat, np.stack([np.zeros(60), score], 1).tolist(), labels))
    out = report.write_report(write_rows(tmp_path / "results.jsonl", rows), tmp_path / "rep", resamples=200)
    assert out.delong_csv is not None
    with out.delong_csv.open() as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == report.DELONG_COLUMNS and [r["repeat"] for r in table] == ["0", "1", "2"]
    for r in table:
        full, base = rows[2 * int(r["repeat"]) + 1], rows[2 * int(r["repeat"])]
        mine, theirs = (np.array(x["per_case"]["logits"])[:, 1] for x in (full, base))
        expected = delong_test(mine, theirs, np.array(labels) == 1)
        assert float(r["p_delong"]) == pytest.approx(expected["p"]) and float(r["p_delong"]) < 0.05
        assert float(r["auroc_arm"]) == pytest.approx(full["metrics"]["auroc"])
    markdown = out.markdown.read_text()
    assert "### DeLong's test against `random` (same test set, per repeat)" in markdown
    assert "| 3 of 3 |" in markdown and "Per repeat, not combined" in markdown
    # Another test set, or one-class outputs, pair nothing; a segmentation metric gets no DeLong table.
    rows[1]["test_set"] = "other"
    assert [d.repeat for d in report.delong_pairs(rows)] == [1, 2]
    assert report.write_report(write_rows(tmp_path / "seg.jsonl", [row("random", 5, 0, dice=0.5)])).delong_csv is None


def test_learning_curves_put_label_counts_on_a_log_axis(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    closed = []
    real = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (closed.append(fig), real(fig)))
    summary = [report.Summary(arm, n, 0.5, 0.1, runs=3) for arm in ("random", "full") for n in (5, 10)]
    report.plot_learning_curves(summary, "dice", tmp_path / "curve.png")
    (fig,) = closed
    assert fig.axes[0].get_xscale() == "log"
