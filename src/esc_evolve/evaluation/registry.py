"""Metric registry, in the style of lm-evaluation-harness: each metric is a function registered by name.

A metric function takes an `EvalContext` (the responses table, settings and lazily built shared resources)
and returns a `MetricOutput`: for every model, per-context values (aggregated by their mean) and/or corpus-level
functions of a list of context indices (so that the bootstrap can recompute them on resampled contexts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from esc_evolve.registry import Registry

if TYPE_CHECKING:
    from esc_evolve.evaluation.resources import EvalContext

CorpusFn = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class SubMetric:
    """One reported number. `higher_is_better` None = no preferred direction (e.g. length)."""

    name: str
    description: str
    higher_is_better: bool | None = True
    percent: bool = False  # shown x100 in reports
    digits: int = 3  # decimals in reports (percent metrics: 1)
    # Shift the bootstrap replicates by their bias (mean of replicates - estimate) before taking percentiles.
    # For statistics that resampling with replacement biases: Distinct-n (a duplicated context adds no new n-gram).
    bias_correct: bool = False


@dataclass
class ModelScores:
    """Per-context values (NaN = not applicable to that context) and corpus-level functions of context indices."""

    per_context: dict[str, np.ndarray] = field(default_factory=dict)
    corpus: dict[str, CorpusFn] = field(default_factory=dict)

    def value(self, name: str, indices: np.ndarray) -> float:
        if name in self.corpus:
            return float(self.corpus[name](indices))
        values = self.per_context[name][indices]
        return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")

    def names(self) -> list[str]:
        return [*self.per_context, *self.corpus]


@dataclass
class MetricOutput:
    submetrics: list[SubMetric]
    scores: dict[str, ModelScores]  # model -> scores
    info: dict[str, Any] = field(default_factory=dict)  # JSON-able extras for metrics.json and the report
    # (A, B) -> per-context score of A against B: 1 win, 0.5 tie, 0 loss, NaN no verdict
    pairwise: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)


MetricFn = Callable[["EvalContext"], MetricOutput]


def _load_builtin_metrics() -> None:
    from esc_evolve.evaluation import metrics  # noqa: F401  (importing registers the built-in metrics)


METRICS: Registry[MetricFn] = Registry("metric", "eval.metrics", load=_load_builtin_metrics)
register_metric = METRICS.register


def get_metric(name: str) -> MetricFn:
    return METRICS.get(name)


def available_metrics() -> list[str]:
    return METRICS.names()
