"""Noise-aware verdicts over seeds: Welch's interval (checked against the textbook formula), the three
verdicts, the one-seed case, the long-format CSV and SUMMARY."""

import csv
import io
import math
import statistics

import pytest
from scipy import stats

from m2f.reproduce.report import RowResult, markdown, to_csv
from m2f.reproduce.summary import write_summary
from m2f.reproduce.tables import TABLES
from m2f.reproduce.verdict import compare, welch_interval


def textbook_welch(a: list[float], b: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Welch-Satterthwaite by hand: se from the two sample variances, df from the formula, t quantile."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + confidence / 2, df) * math.sqrt(va + vb)
    diff = statistics.fmean(a) - statistics.fmean(b)
    return diff - half, diff + half


BASE = [51.0, 51.6, 50.9]


@pytest.mark.parametrize(("ours", "paper", "expected"), [
    ([40.1, 40.5, 39.8], 47.1, "agrees"),          # clearly lower, paper lower
    ([55.2, 56.0, 55.1], 47.1, "disagrees"),       # clearly higher, paper lower
    ([50.2, 52.9, 49.5], 47.1, "within noise"),    # a lower mean, but the interval holds 0
    ([54.9, 55.3, 55.0], 52.2, "agrees"),          # both higher
    ([40.1, 40.5], 51.9, ""),                      # the paper saw no change: not judged
])
def test_verdicts_follow_the_welch_interval(ours, paper, expected):
    result = compare(ours, BASE, paper, 51.9)
    low, high = textbook_welch(ours, BASE)
    assert (result.low, result.high) == pytest.approx((low, high), rel=1e-9)
    assert result.diff == pytest.approx(statistics.fmean(ours) - statistics.fmean(BASE))
    assert result.verdict == expected
    if expected == "within noise":
        assert low < 0 < high


def test_welch_interval_of_unequal_spreads_and_sizes():
    a, b = [10.0, 12.5, 9.0, 11.0], [8.0, 8.2]
    assert welch_interval(a, b) == pytest.approx(textbook_welch(a, b), rel=1e-9)
    # No spread on either side (a deterministic metric): the difference is exact.
    assert welch_interval([3.0, 3.0], [1.0, 1.0]) == (2.0, 2.0)


def test_one_seed_gives_only_the_sign():
    assert compare([40.0], BASE, 47.1, 51.9).verdict == "sign agrees (1 seed)"
    assert compare([40.0], [51.0], 52.2, 51.9).verdict == "sign disagrees (1 seed)"
    assert compare([40.0], [51.0], 47.1, 51.9).low is None
    assert compare([], BASE, 47.1, 51.9) is None


def seeded_table4a() -> list[RowResult]:
    rows = TABLES["table4a"].rows

    def result(row, pq, ap, miou):
        return RowResult(row, "done", {"PQ": statistics.fmean(pq), "AP": statistics.fmean(ap),
                                       "mIoU": statistics.fmean(miou)},
                         samples={"PQ": pq, "AP": ap, "mIoU": miou}, seeds=[0, 1, 2])

    return [result(rows[0], BASE, [19.8, 20.1, 19.5], [65.7, 65.0, 66.1]),
            result(rows[1], [40.1, 40.5, 39.8], [22.0, 22.4, 21.9], [65.0, 66.0, 64.6]),
            result(rows[2], [42.2, 43.0, 41.9], [18.3, 19.9, 17.6], [65.1, 65.3, 65.2])]


def test_report_and_csv_carry_mean_spread_every_seed_and_the_verdict(tmp_path):
    table, results = TABLES["table4a"], seeded_table4a()
    text = markdown(table, "tiny", results, setting="test")
    line = next(ln for ln in text.splitlines() if ln.startswith("| - masked attention"))
    low, high = textbook_welch([40.1, 40.5, 39.8], BASE)
    assert "40.1 ± 0.35 / 47.1" in line  # std 0.351: under 1, so two decimals like fractions
    assert f"PQ -11.0 [{low:+.1f}, {high:+.1f}] / -4.8" in line
    assert "PQ agrees" in line and "AP disagrees" in line and "mIoU within noise" in line
    assert "Welch's t-test" in text and "| - masked attention | PQ | 40.1 | 40.5 | 39.8 |" in text
    records = list(csv.DictReader(io.StringIO(to_csv(table, results))))
    assert {"table", "row", "metric", "seeds", "mean", "std", "values", "paper", "baseline_diff",
            "verdict"} <= set(records[0])
    pq = next(r for r in records if r["row"] == "- masked attention" and r["metric"] == "PQ")
    assert pq["values"] == "40.1;40.5;39.8" and pq["seeds"] == "3" and float(pq["paper"]) == 47.1
    assert float(pq["std"]) == pytest.approx(statistics.stdev([40.1, 40.5, 39.8]), rel=1e-5)

    (tmp_path / "table4a.csv").write_text(to_csv(table, results))
    one = TABLES["table12d"]
    (tmp_path / "table12d.csv").write_text(to_csv(one, [RowResult(one.rows[0], "done", {"PQ": 30.0, "AP": 9.0}),
                                                        RowResult(one.rows[1], "done", {"PQ": 31.0, "AP": 8.0})]))
    (tmp_path / "table5.csv").write_text("row,metric,ours\n")  # the format before verdicts: skipped
    write_summary(tmp_path)
    summary = {r["table"]: r for r in csv.DictReader(io.StringIO((tmp_path / "SUMMARY.csv").read_text()))}
    assert set(summary) == {"table4a", "table12d", "total"}
    verdicts = [r["verdict"] for r in records if r["verdict"]]
    # PQ drops clearly in both rows; AP rises without masked attention (paper: falls); the rest overlap 0.
    assert verdicts == ["agrees", "disagrees", "within noise", "agrees", "within noise", "within noise"]
    assert [summary["table4a"][k] for k in ("agrees", "within noise", "disagrees")] == ["2", "3", "1"]
    assert (summary["table12d"]["1 seed"], summary["table12d"]["comparisons"]) == ("2", "2")
    assert summary["total"]["comparisons"] == str(len(verdicts) + 2)
    assert "[table4a](table4a.md)" in (tmp_path / "SUMMARY.md").read_text()


def test_a_metric_without_a_value_is_not_judged():
    # Attention mass with no matched query is NaN (json NaN): no verdict, no crash.
    assert compare([float("nan"), 0.4], [0.2, 0.3], 0.23, 0.53).verdict == ""
    assert compare([float("nan")], [0.2], 0.23, 0.53).verdict == ""
