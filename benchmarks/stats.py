"""Benchmark statistics: Student-t intervals over seeds and draws, and Wilson intervals of proportions."""

from __future__ import annotations

import math
from statistics import NormalDist

from numpy.typing import ArrayLike

from trl_moe_rm.accuracy import _as_1d, _check_confidence, bootstrap_ci, pairwise_accuracy, pairwise_outcomes


__all__ = ["bootstrap_ci", "mean_ci", "pairwise_accuracy", "pairwise_outcomes", "wilson_interval"]


def mean_ci(values: ArrayLike, confidence: float = 0.95) -> tuple[float, float, float]:
    """
    Mean of a sample with its Student-t confidence interval.

    This is the interval to report for a mean over independent random draws (e.g. several seeds of a benchmark):
    `mean ± t_{(1 + confidence) / 2, n - 1} * s / sqrt(n)`, with `s` the sample standard deviation (`ddof=1`).

    Args:
        values (`ArrayLike`):
            One-dimensional sample (a scalar is treated as a sample of size one).
        confidence (`float`, *optional*, defaults to `0.95`):
            Confidence level, strictly between 0 and 1.

    Returns:
        `tuple[float, float, float]`: `(mean, low, high)`. With a single value the interval is undefined and both
        bounds are `nan`. With a constant sample of two or more values, `low == high == mean`.

    Raises:
        `ValueError`: If `values` is empty or not one-dimensional, or if `confidence` is not in `(0, 1)`.

    Example:

    ```python
    >>> from benchmarks.stats import mean_ci

    >>> mean, low, high = mean_ci([1.0, 2.0, 3.0])
    >>> round(mean, 3), round(low, 3), round(high, 3)
    (2.0, -0.484, 4.484)
    ```
    """
    from scipy import stats as scipy_stats  # imported lazily: scipy is only needed here

    array = _as_1d(values)
    _check_confidence(confidence)
    mean = float(array.mean())
    n = array.size
    if n == 1:
        return mean, math.nan, math.nan
    sem = float(array.std(ddof=1)) / math.sqrt(n)
    if sem == 0.0:
        return mean, mean, mean
    half_width = float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, df=n - 1)) * sem
    return mean, mean - half_width, mean + half_width


def wilson_interval(successes: float, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """
    Wilson score interval for a binomial proportion.

    Unlike the normal-approximation (Wald) interval, it stays inside `[0, 1]` and behaves well for proportions close
    to 0 or 1 and for small `total`.

    Args:
        successes (`float`):
            Number of successes, in `[0, total]`. Fractional values are accepted, e.g. when ties count as half a
            success (see [`pairwise_accuracy`]).
        total (`int`):
            Number of trials, strictly positive.
        confidence (`float`, *optional*, defaults to `0.95`):
            Confidence level, strictly between 0 and 1.

    Returns:
        `tuple[float, float]`: The `(low, high)` bounds, within `[0, 1]`.

    Raises:
        `ValueError`: If `total <= 0`, if `successes` is outside `[0, total]`, or if `confidence` is not in `(0, 1)`.

    Example:

    ```python
    >>> from benchmarks.stats import wilson_interval

    >>> low, high = wilson_interval(8, 10)
    >>> round(low, 4), round(high, 4)
    (0.4902, 0.9433)
    ```
    """
    _check_confidence(confidence)
    if total <= 0:
        raise ValueError(f"`total` must be strictly positive, got {total}.")
    if not 0 <= successes <= total:
        raise ValueError(f"`successes` must be in [0, total] = [0, {total}], got {successes}.")
    z = NormalDist().inv_cdf((1.0 + confidence) / 2.0)
    p = successes / total
    z2_n = z * z / total
    denominator = 1.0 + z2_n
    center = (p + z2_n / 2.0) / denominator
    half_width = z * math.sqrt(p * (1.0 - p) / total + z2_n / (4.0 * total)) / denominator
    # At p = 0 (p = 1) the lower (upper) bound is exactly 0 (1); set it so rounding does not leave a tiny residue.
    low = 0.0 if successes == 0 else max(0.0, center - half_width)
    high = 1.0 if successes == total else min(1.0, center + half_width)
    return low, high
