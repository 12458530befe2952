"""Paired bootstrap on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from esc_evolve.evaluation.stats import (
    Interval,
    mean_fn,
    paired_bootstrap,
    percentile_interval,
    resample_indices,
)


def test_ci_contains_true_difference_and_excludes_zero():
    rng = np.random.default_rng(0)
    b = rng.normal(3.0, 1.0, size=300)
    a = b + 0.5 + rng.normal(0, 0.3, size=300)  # true paired difference 0.5
    ci = paired_bootstrap(mean_fn(a), mean_fn(b), len(a), n_resamples=1000, seed=1)
    assert ci.low < 0.5 < ci.high
    assert ci.excludes(0.0)


def test_identical_models_ci_contains_zero():
    values = np.random.default_rng(1).normal(size=100)
    ci = paired_bootstrap(mean_fn(values), mean_fn(values.copy()), 100, n_resamples=500, seed=2)
    assert ci.value == 0.0 and ci.low <= 0.0 <= ci.high
    assert not ci.excludes(0.0)


def test_no_difference_in_distribution_is_not_significant():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=200), rng.normal(size=200)
    ci = paired_bootstrap(mean_fn(a), mean_fn(b), 200, n_resamples=1000, seed=4)
    assert ci.low < 0.0 < ci.high


def test_seeded_and_reproducible():
    first = resample_indices(10, 5, seed=7)
    second = resample_indices(10, 5, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(first, second, strict=True))


def test_cluster_resamples_take_whole_conversations():
    groups = [0, 0, 0, 1, 2, 2]
    for idx in resample_indices(6, 50, seed=0, groups=groups):
        counts = np.bincount(idx, minlength=6)
        assert counts[0] == counts[1] == counts[2] and counts[4] == counts[5]


def test_nan_values_are_skipped_and_reported():
    fn = mean_fn(np.array([1.0, np.nan, 3.0]))
    assert fn(np.array([0, 1, 2])) == 2.0
    assert np.isnan(fn(np.array([1, 1])))
    iv = percentile_interval(float("nan"), np.array([1.0, 2.0]))
    assert np.isnan(iv.value) and not iv.excludes()
    assert Interval(1.0, 0.5, 1.5).excludes(0.0) and not Interval(1.0, -0.5, 1.5).excludes(0.0)


def test_percentile_interval_level():
    iv = percentile_interval(50.0, np.arange(101, dtype=float), level=0.9)
    assert (iv.low, iv.high) == pytest.approx((5.0, 95.0))
