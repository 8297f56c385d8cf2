"""Noise-aware verdicts: does a row differ from the baseline row the way the paper says, beyond the seeds' noise?

For one metric of one row, our difference to the baseline row is mean(row seeds) - mean(baseline seeds); its
uncertainty is the 95% confidence interval of Welch's t-test (two independent samples, unequal variances).
Welch because the seeds of two rows are independent trainings (seed k of one row shares nothing with seed k of
another beyond the number, so a paired test has nothing to pair) and because an ablation can change the
run-to-run spread as well as the mean (Student's t-test would assume equal variances). With 2-5 seeds a
bootstrap interval is too coarse (it can take only a handful of distinct values) and too narrow; the t interval
is exact under normal noise.

- ``agrees``: the interval excludes 0 and the difference has the paper's sign;
- ``disagrees``: the interval excludes 0 and the sign is the opposite;
- ``within noise``: the interval contains 0 (ours cannot tell a change from the run-to-run spread);
- with one seed on either side no interval exists: the verdict says only whether the sign agrees
  (``sign agrees (1 seed)`` / ``sign disagrees (1 seed)``), which cannot separate an effect from noise.

A paper difference under `NO_CHANGE` is "no change" in the paper and is not judged ("").
"""

import math
from dataclasses import dataclass

NO_CHANGE = 0.05  # paper differences smaller than this (in the metric's units) count as equal
CONFIDENCE = 0.95
TEST = "Welch's t-test, 95% interval of the difference of means (independent seeds, unequal variances)"
VERDICTS = ("agrees", "within noise", "disagrees")
UNTESTED = ("sign agrees (1 seed)", "sign disagrees (1 seed)")


@dataclass(frozen=True)
class Comparison:
    """One metric of one row against the baseline row.

    Args:
        diff: mean(ours) - mean(ours at the baseline row).
        low, high: the 95% interval of `diff` (None with one seed on either side).
        paper_diff: the paper's difference to its baseline row.
        verdict: one of `VERDICTS` or `UNTESTED`, or "" (nothing to judge).
    """

    diff: float
    low: float | None
    high: float | None
    paper_diff: float | None
    verdict: str


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for one value); NaN in, NaN out (`statistics.stdev`
    raises on NaN, which a metric without matches can be)."""
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def welch_interval(ours: list[float], base: list[float], *, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The `confidence` interval of mean(ours) - mean(base) by Welch's t-test (both need >= 2 values)."""
    from scipy import stats

    diff = mean_std(ours)[0] - mean_std(base)[0]
    if mean_std(ours)[1] == 0 and mean_std(base)[1] == 0:
        # Identical seeds on both sides (deterministic metric): no spread, the difference is exact.
        return diff, diff
    interval = stats.ttest_ind(ours, base, equal_var=False).confidence_interval(confidence)
    return float(interval.low), float(interval.high)


def compare(ours: list[float], base: list[float], paper: float | None, paper_base: float | None) -> Comparison | None:
    """The verdict of one row's metric (its seeds' values) against the baseline's; None without values."""
    if not ours or not base:
        return None
    diff = mean_std(ours)[0] - mean_std(base)[0]
    paper_diff = None if paper is None or paper_base is None else paper - paper_base
    low = high = None
    if len(ours) > 1 and len(base) > 1:
        low, high = welch_interval(ours, base)
    if paper_diff is None or abs(paper_diff) < NO_CHANGE or math.isnan(diff):
        return Comparison(diff, low, high, paper_diff, "")
    same_sign = (diff > 0) == (paper_diff > 0)
    if low is None:
        verdict = UNTESTED[0] if same_sign and diff != 0 else UNTESTED[1]
    elif low <= 0 <= high or math.isnan(low):
        verdict = "within noise"
    else:
        verdict = "agrees" if same_sign else "disagrees"
    return Comparison(diff, low, high, paper_diff, verdict)
