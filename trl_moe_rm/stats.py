# Copyright 2025 The trl_moe_rm Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Small statistics helpers shared by the benchmarks and the evaluation metrics.

Everything here works on plain NumPy arrays (or anything `np.asarray` accepts) and returns plain Python floats, so the
results can be written to JSON directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike


__all__ = ["bootstrap_ci", "mean_ci", "pairwise_accuracy", "pairwise_outcomes", "wilson_interval"]

# Upper bound on the number of elements materialised at once when resampling, to keep memory bounded for big inputs.
_MAX_RESAMPLE_ELEMENTS = 2**22


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be strictly between 0 and 1, got {confidence}.")


def _as_1d(values: ArrayLike, name: str = "values") -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be one-dimensional, got shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"`{name}` must contain at least one value.")
    return array


def _apply_statistic(statistic: Callable[..., ArrayLike], samples: np.ndarray) -> np.ndarray:
    """Applies `statistic` to every row of `samples`, vectorised through an `axis` argument when supported."""
    try:
        result = np.asarray(statistic(samples, axis=-1), dtype=np.float64)
        if result.shape == (samples.shape[0],):
            return result
    except TypeError:  # the statistic does not accept `axis`
        pass
    return np.array([float(statistic(row)) for row in samples], dtype=np.float64)


def bootstrap_ci(
    values: ArrayLike,
    statistic: Callable[..., ArrayLike] = np.mean,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> tuple[float, float]:
    """
    Percentile bootstrap confidence interval of a statistic.

    The sample is resampled with replacement `num_resamples` times, `statistic` is computed on every resample, and the
    `(1 - confidence) / 2` and `(1 + confidence) / 2` quantiles of those statistics are returned.

    Args:
        values (`ArrayLike`):
            One-dimensional sample (a scalar is treated as a sample of size one).
        statistic (`Callable`, *optional*, defaults to `np.mean`):
            Function mapping a 1D array to a scalar. If it accepts an `axis` keyword (as NumPy reductions do), it is
            applied to all resamples at once; otherwise it is called once per resample.
        num_resamples (`int`, *optional*, defaults to `1000`):
            Number of bootstrap resamples.
        confidence (`float`, *optional*, defaults to `0.95`):
            Confidence level, strictly between 0 and 1.
        seed (`int` or `None`, *optional*, defaults to `0`):
            Seed of the NumPy random generator, for reproducible intervals. `None` draws fresh entropy.

    Returns:
        `tuple[float, float]`: The `(low, high)` bounds. For a single value or a constant sample, every resample is
        identical and the interval is degenerate: `low == high == statistic(values)`.

    Raises:
        `ValueError`: If `values` is empty or not one-dimensional, if `num_resamples < 1`, or if `confidence` is not in
        `(0, 1)`.

    Example:

    ```python
    >>> from trl_moe_rm.stats import bootstrap_ci

    >>> low, high = bootstrap_ci([0.0, 1.0, 1.0, 1.0, 0.0, 1.0], num_resamples=2000)
    >>> low <= 4 / 6 <= high
    True
    ```
    """
    array = _as_1d(values)
    _check_confidence(confidence)
    if num_resamples < 1:
        raise ValueError(f"`num_resamples` must be at least 1, got {num_resamples}.")

    if np.all(array == array[0]):  # a single value or a constant sample: every resample is the same sample
        point = float(statistic(array))
        return point, point

    rng = np.random.default_rng(seed)
    n = array.size
    chunk_size = max(1, _MAX_RESAMPLE_ELEMENTS // n)
    stats = np.empty(num_resamples, dtype=np.float64)
    for start in range(0, num_resamples, chunk_size):
        stop = min(start + chunk_size, num_resamples)
        indices = rng.integers(0, n, size=(stop - start, n))
        stats[start:stop] = _apply_statistic(statistic, array[indices])

    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


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
    >>> from trl_moe_rm.stats import mean_ci

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
    >>> from trl_moe_rm.stats import wilson_interval

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


def pairwise_outcomes(chosen_scores: ArrayLike, rejected_scores: ArrayLike) -> np.ndarray:
    """
    Per-pair outcome of a preference comparison: `1.0` if the chosen response scores higher than the rejected one,
    `0.0` if lower, and `0.5` on a tie.

    Args:
        chosen_scores (`ArrayLike`):
            Scores of the preferred responses, one per pair.
        rejected_scores (`ArrayLike`):
            Scores of the dispreferred responses, one per pair, aligned with `chosen_scores`.

    Returns:
        `np.ndarray`: A float64 array of shape `(num_pairs,)` with values in `{0.0, 0.5, 1.0}`. Its mean is the
        [`pairwise_accuracy`]; it is also the natural input of [`bootstrap_ci`].

    Raises:
        `ValueError`: If the inputs are empty, not one-dimensional, of different lengths, or contain NaN.
    """
    chosen = _as_1d(chosen_scores, "chosen_scores")
    rejected = _as_1d(rejected_scores, "rejected_scores")
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"`chosen_scores` and `rejected_scores` must have the same length, got {chosen.size} and {rejected.size}."
        )
    if np.isnan(chosen).any() or np.isnan(rejected).any():
        raise ValueError("Scores must not contain NaN.")
    return np.where(chosen > rejected, 1.0, np.where(chosen == rejected, 0.5, 0.0))


def pairwise_accuracy(chosen_scores: ArrayLike, rejected_scores: ArrayLike) -> float:
    """
    Fraction of preference pairs where the chosen response gets the higher score.

    Ties (`chosen == rejected`) count as half a success (`0.5`), so a model that outputs a constant score gets an
    accuracy of exactly 0.5, the chance level, instead of 0 (strict `>`) or 1 (`>=`).

    Args:
        chosen_scores (`ArrayLike`):
            Scores of the preferred responses, one per pair.
        rejected_scores (`ArrayLike`):
            Scores of the dispreferred responses, one per pair, aligned with `chosen_scores`.

    Returns:
        `float`: The accuracy, in `[0, 1]`.

    Raises:
        `ValueError`: If the inputs are empty, not one-dimensional, of different lengths, or contain NaN.

    Example:

    ```python
    >>> from trl_moe_rm.stats import pairwise_accuracy

    >>> pairwise_accuracy([2.0, 1.0, 0.0, 3.0], [1.0, 2.0, 0.0, 0.5])
    0.625
    ```
    """
    return float(pairwise_outcomes(chosen_scores, rejected_scores).mean())
