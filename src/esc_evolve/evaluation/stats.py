"""Paired bootstrap confidence intervals (percentile method, Efron & Tibshirani 1993).

One set of resamples (seeded) is drawn per evaluation and shared by every model and metric, so a difference
between two models is computed on the same resampled contexts (paired). A resample draws n contexts with
replacement ("context" unit) or, for the cluster bootstrap, as many conversations as the table has, with
replacement, taking all their contexts ("conversation" unit). Corpus-level metrics (BLEU, Distinct, preference
bias...) are recomputed on each resample; per-context metrics are averaged (NaN = not applicable, skipped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

ScoreFn = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class Interval:
    value: float  # the estimate on all contexts
    low: float
    high: float

    def excludes(self, null: float = 0.0) -> bool:
        return bool(np.isfinite(self.low) and np.isfinite(self.high) and (self.low > null or self.high < null))


def resample_indices(n: int, n_resamples: int, seed: int, groups: Sequence[int] | None = None) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    if groups is None:
        return list(rng.integers(0, n, size=(n_resamples, n)))
    groups = np.asarray(groups)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    draws = rng.integers(0, len(members), size=(n_resamples, len(members)))
    return [np.concatenate([members[g] for g in row]) for row in draws]


def replicates(fn: ScoreFn, resamples: list[np.ndarray]) -> np.ndarray:
    return np.array([fn(idx) for idx in resamples], dtype=float)


def percentile_interval(value: float, reps: np.ndarray, level: float = 0.95) -> Interval:
    finite = reps[np.isfinite(reps)]
    if not np.isfinite(value) or finite.size == 0:
        return Interval(value, float("nan"), float("nan"))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high))


def paired_bootstrap(
    score_a: ScoreFn,
    score_b: ScoreFn,
    n: int,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: Sequence[int] | None = None,
) -> Interval:
    """CI of score_a - score_b, both recomputed on the same resampled context indices."""
    resamples = resample_indices(n, n_resamples, seed, groups)
    full = np.arange(n)
    delta = score_a(full) - score_b(full)
    return percentile_interval(delta, replicates(score_a, resamples) - replicates(score_b, resamples), level)


def mean_fn(values: np.ndarray) -> ScoreFn:
    """Mean of per-context values over a resample, ignoring NaN (not-applicable) contexts."""

    def fn(idx: np.ndarray) -> float:
        chosen = values[idx]
        chosen = chosen[~np.isnan(chosen)]
        return float(chosen.mean()) if chosen.size else float("nan")

    return fn
