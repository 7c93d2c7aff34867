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
Pairwise accuracy: the one definition of how often a reward model prefers the chosen response, with its tie rule.

A pair scores `1.0` when the chosen response gets the higher reward, `0.0` when it gets the lower one, and `0.5` on a
tie, so a constant reward model sits exactly at chance (0.5). Everything that reports a pairwise accuracy uses it:
[`~trl_moe_rm.scoring.PairScores.accuracy`], the personalization fit, the `evaluate` metric and the benchmarks.
[`MoERewardTrainer`] alone logs TRL's own training `accuracy` (strict `>`, a tie counts as an error), under TRL's name,
so that its logs compare with `RewardTrainer`'s.

[`bootstrap_ci`] gives a percentile bootstrap interval of any statistic (the metric's and the benchmarks' intervals).
Everything works on plain NumPy arrays and returns Python floats.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike


__all__ = ["bootstrap_ci", "pairwise_accuracy", "pairwise_outcomes"]

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
    >>> from trl_moe_rm.accuracy import bootstrap_ci

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
    accuracy of exactly 0.5, the chance level, instead of 0 (strict `>`) or 1 (`>=`). The arguments and errors are
    those of [`pairwise_outcomes`]; the result is the mean of its outcomes, a float in `[0, 1]`.

    Raises:
        `ValueError`: If the inputs are empty, not one-dimensional, of different lengths, or contain NaN.

    Example:

    ```python
    >>> from trl_moe_rm.accuracy import pairwise_accuracy

    >>> pairwise_accuracy([2.0, 1.0, 0.0, 3.0], [1.0, 2.0, 0.0, 0.5])
    0.625
    ```
    """
    return float(pairwise_outcomes(chosen_scores, rejected_scores).mean())
