"""
Tests of `trl_moe_rm.accuracy` (pairwise accuracy, bootstrap) and `benchmarks.stats` (Student-t and Wilson
intervals): interval coverage on simulated data, known values, ties and input validation.
"""

import math

import numpy as np
import pytest

from benchmarks.stats import mean_ci, wilson_interval
from trl_moe_rm.accuracy import bootstrap_ci, pairwise_accuracy, pairwise_outcomes


# ---------------------------------------------------------------------------------------------------------- coverage


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1234)
    true_mean, num_trials, sample_size = 1.5, 300, 40
    covered = 0
    for trial in range(num_trials):
        sample = rng.normal(true_mean, 2.0, size=sample_size)
        low, high = bootstrap_ci(sample, num_resamples=500, seed=trial)
        covered += low <= true_mean <= high
    # The percentile bootstrap slightly under-covers at n=40; the binomial sd of the estimate is ~1.3 points.
    assert 0.90 <= covered / num_trials <= 0.99


def test_mean_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    true_mean, num_trials = -3.0, 1000
    samples = rng.normal(true_mean, 0.5, size=(num_trials, 5))  # few draws: the t quantile matters here
    covered = sum(low <= true_mean <= high for _, low, high in map(mean_ci, samples))
    assert 0.935 <= covered / num_trials <= 0.965


def test_mean_ci_with_normal_quantile_would_under_cover():
    # Sanity check of the previous test's sensitivity: with 5 draws, a z-interval covers only ~88%.
    rng = np.random.default_rng(0)
    samples = rng.normal(0.0, 1.0, size=(1000, 5))
    half_width = 1.959964 * samples.std(axis=1, ddof=1) / math.sqrt(5)
    z_coverage = np.mean(np.abs(samples.mean(axis=1)) <= half_width)
    t_coverage = np.mean([low <= 0.0 <= high for _, low, high in map(mean_ci, samples)])
    assert z_coverage < 0.91 < 0.935 <= t_coverage


def test_wilson_interval_covers_the_true_proportion_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    p, total, num_trials = 0.3, 60, 3000
    successes = rng.binomial(total, p, size=num_trials)
    covered = sum(low <= p <= high for low, high in (wilson_interval(int(s), total) for s in successes))
    assert 0.93 <= covered / num_trials <= 0.97


# ---------------------------------------------------------------------------------------------------- bootstrap_ci


def test_bootstrap_ci_contains_the_point_estimate_and_is_reproducible():
    values = np.random.default_rng(3).exponential(size=50)
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high
    assert bootstrap_ci(values) == (low, high)  # default seed=0
    assert bootstrap_ci(values, seed=1) != (low, high)


def test_bootstrap_ci_higher_confidence_gives_a_wider_interval():
    values = np.random.default_rng(4).normal(size=100)
    low_80, high_80 = bootstrap_ci(values, confidence=0.80)
    low_99, high_99 = bootstrap_ci(values, confidence=0.99)
    assert low_99 < low_80 < high_80 < high_99


@pytest.mark.parametrize("values", [[2.5], 2.5, [0.1, 0.1, 0.1], np.ones(1000)])
def test_bootstrap_ci_is_degenerate_for_single_or_constant_values(values):
    expected = float(np.mean(values))
    assert bootstrap_ci(values) == (expected, expected)


def test_bootstrap_ci_statistic_without_axis_matches_vectorised_statistic():
    values = np.random.default_rng(5).normal(size=30)
    vectorised = bootstrap_ci(values, statistic=np.median, num_resamples=200)
    per_resample = bootstrap_ci(values, statistic=lambda sample: float(np.median(sample)), num_resamples=200)
    assert vectorised == pytest.approx(per_resample)
    low, high = vectorised
    assert low <= np.median(values) <= high


def test_bootstrap_ci_chunked_resampling_matches_a_direct_computation(monkeypatch):
    import trl_moe_rm.accuracy as accuracy

    values = np.random.default_rng(6).normal(size=64)
    full = bootstrap_ci(values, num_resamples=100)
    monkeypatch.setattr(accuracy, "_MAX_RESAMPLE_ELEMENTS", 64 * 7)  # 7 resamples per chunk
    assert bootstrap_ci(values, num_resamples=100) == pytest.approx(full, rel=1e-12)

    indices = np.random.default_rng(0).integers(0, 64, size=(100, 64))
    assert full == pytest.approx(np.quantile(values[indices].mean(axis=1), [0.025, 0.975]), rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"values": []}, "at least one value"),
        ({"values": np.zeros((2, 2))}, "one-dimensional"),
        ({"values": [1.0, 2.0], "num_resamples": 0}, "num_resamples"),
        ({"values": [1.0, 2.0], "confidence": 1.0}, "confidence"),
        ({"values": [1.0, 2.0], "confidence": 0.0}, "confidence"),
    ],
)
def test_bootstrap_ci_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(**kwargs)


# ------------------------------------------------------------------------------------------------------------ mean_ci


def test_mean_ci_known_value():
    mean, low, high = mean_ci([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.302653, sem = 1 / sqrt(3)
    assert mean == 2.0
    assert low == pytest.approx(2.0 - 4.302653 / math.sqrt(3), abs=1e-6)
    assert high == pytest.approx(2.0 + 4.302653 / math.sqrt(3), abs=1e-6)
    assert low < mean < high


def test_mean_ci_single_value_and_constant_values():
    mean, low, high = mean_ci([4.0])
    assert mean == 4.0 and math.isnan(low) and math.isnan(high)
    assert mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


def test_mean_ci_errors():
    with pytest.raises(ValueError, match="at least one value"):
        mean_ci([])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=95)


# ----------------------------------------------------------------------------------------------------- wilson_interval


def test_wilson_interval_known_values():
    # Reference values of the Wilson score interval (e.g. statsmodels' proportion_confint(method="wilson")).
    assert wilson_interval(8, 10) == pytest.approx((0.4901625, 0.9433178), abs=1e-6)
    assert wilson_interval(50, 100) == pytest.approx((0.4038315, 0.5961685), abs=1e-6)
    # No successes: the upper bound is z^2 / (n + z^2) = 3.841459 / 13.841459.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775328), abs=1e-6)


def test_wilson_interval_edges_stay_in_unit_interval():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.0 < high < 0.35
    low, high = wilson_interval(10, 10)
    assert 0.65 < low < 1.0 and high == pytest.approx(1.0)
    low, high = wilson_interval(2.5, 5)  # fractional successes, e.g. ties counted as half a success
    assert low < 0.5 < high and low == pytest.approx(1.0 - high)


@pytest.mark.parametrize(
    "successes, total, confidence, match",
    [(1, 0, 0.95, "total"), (11, 10, 0.95, "successes"), (-1, 10, 0.95, "successes"), (1, 10, 1.5, "confidence")],
)
def test_wilson_interval_errors(successes, total, confidence, match):
    with pytest.raises(ValueError, match=match):
        wilson_interval(successes, total, confidence=confidence)


# --------------------------------------------------------------------------------------------------- pairwise accuracy


def test_pairwise_accuracy_counts_ties_as_half():
    chosen = [2.0, 1.0, 0.0, 3.0]
    rejected = [1.0, 2.0, 0.0, 0.5]
    np.testing.assert_array_equal(pairwise_outcomes(chosen, rejected), [1.0, 0.0, 0.5, 1.0])
    assert pairwise_accuracy(chosen, rejected) == 0.625
    assert pairwise_accuracy([0.3] * 7, [0.3] * 7) == 0.5  # a constant reward sits exactly at chance
    assert pairwise_accuracy([1.0, 2.0], [0.0, 1.0]) == 1.0
    assert pairwise_accuracy([0.0], [1.0]) == 0.0
    assert pairwise_accuracy(np.float32(1.5), np.float32(1.0)) == 1.0  # scalars are one pair


def test_pairwise_accuracy_does_not_round_close_scores():
    assert pairwise_accuracy([1.0 + 1e-12], [1.0]) == 1.0


@pytest.mark.parametrize(
    "chosen, rejected, match",
    [
        ([], [], "at least one value"),
        ([1.0, 2.0], [1.0], "same length"),
        ([1.0, float("nan")], [0.0, 0.0], "NaN"),
        ([[1.0]], [[0.0]], "one-dimensional"),
    ],
)
def test_pairwise_accuracy_errors(chosen, rejected, match):
    with pytest.raises(ValueError, match=match):
        pairwise_accuracy(chosen, rejected)
