"""Run the registered metrics on a responses table and attach paired-bootstrap confidence intervals."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from esc_evolve.errors import EscEvolveError
from esc_evolve.evaluation.embedding import Embedder
from esc_evolve.evaluation.judge import CallableJudge, Judge
from esc_evolve.evaluation.registry import MetricOutput, ModelScores, SubMetric, get_metric
from esc_evolve.evaluation.resources import EvalContext
from esc_evolve.evaluation.responses import HUMAN, ResponsesTable
from esc_evolve.evaluation.settings import EvaluationSettings
from esc_evolve.evaluation.stats import Interval, mean_fn, percentile_interval, replicates, resample_indices
from esc_evolve.evaluation.strategy import StrategyClassifier

log = logging.getLogger(__name__)


@dataclass
class Difference:
    a: str
    b: str
    metric: str
    interval: Interval  # of value(a) - value(b)
    higher_is_better: bool | None

    @property
    def significant(self) -> bool:
        return self.interval.excludes(0.0)

    @property
    def winner(self) -> str | None:
        """The model the significant difference favours (None: not significant or no preferred direction)."""
        if not self.significant or self.higher_is_better is None:
            return None
        return self.a if (self.interval.value > 0) == self.higher_is_better else self.b


@dataclass
class WinRate:
    a: str
    b: str
    interval: Interval  # A's mean score (win 1, tie 0.5, loss 0); 0.5 = no preference
    n: int
    wins: int
    ties: int
    losses: int

    @property
    def significant(self) -> bool:
        return self.interval.excludes(0.5)


@dataclass
class EvalResult:
    models: list[str]
    submetrics: list[SubMetric]
    estimates: dict[str, dict[str, Interval]]
    differences: list[Difference]
    win_rates: list[WinRate]
    headline: tuple[str, str] | None
    info: dict[str, Any]
    per_context: dict[str, dict[str, np.ndarray]]
    settings: EvaluationSettings
    n_contexts: int
    n_conversations: int
    notes: list[str] = field(default_factory=list)

    def submetric(self, name: str) -> SubMetric:
        return next(s for s in self.submetrics if s.name == name)

    def difference(self, a: str, b: str, metric: str) -> Difference | None:
        return next((d for d in self.differences if (d.a, d.b, d.metric) == (a, b, metric)), None)


def evaluate(
    table: ResponsesTable,
    settings: EvaluationSettings | None = None,
    *,
    embedder: Embedder | None = None,
    classifier: StrategyClassifier | None = None,
    judge: Judge | Callable[[list[dict[str, str]]], str] | None = None,
    out_dir: Path | None = None,
) -> EvalResult:
    """Every metric of `settings.metrics`, with percentile CIs for each model and each model pair.

    `judge`: a `Judge`, or a plain function `messages -> str` (asked once per prompt)."""
    settings = settings or EvaluationSettings()
    judge = judge if judge is None or isinstance(judge, Judge) else CallableJudge(judge)
    ctx = EvalContext(table, settings, embedder, classifier, judge, out_dir)
    outputs = _run_metrics(ctx)
    groups = table.conversation_groups() if settings.bootstrap_unit == "conversation" else None
    resamples = resample_indices(len(table), settings.bootstrap_samples, settings.seed, groups)
    submetrics, estimates, reps, per_context = _estimates(
        table.models, outputs, resamples, len(table), settings.ci_level
    )
    pairs = comparison_pairs(table.models, headline_pair(table.models, settings.headline))
    differences = _differences(pairs, submetrics, estimates, reps, settings.ci_level)
    win_rates = [
        _win_rate(a, b, v, resamples, settings.ci_level) for o in outputs.values() for (a, b), v in o.pairwise.items()
    ]
    return EvalResult(
        models=table.models,
        submetrics=submetrics,
        estimates=estimates,
        differences=differences,
        win_rates=win_rates,
        headline=headline_pair(table.models, settings.headline),
        info={name: out.info for name, out in outputs.items()},
        per_context=per_context,
        settings=settings,
        n_contexts=len(table),
        n_conversations=len(set(table.conversation_groups())),
        notes=ctx.notes + [f"dropped {n} context(s) missing from {m}" for m, n in table.dropped.items()],
    )


def _run_metrics(ctx: EvalContext) -> dict[str, MetricOutput]:
    outputs = {}
    for name in ctx.settings.metrics:
        fn = get_metric(name)
        log.info("metric %s", name)
        try:
            outputs[name] = fn(ctx)
        except EscEvolveError as exc:  # e.g. no classifier training data: report the rest, say what is missing
            ctx.notes.append(f"metric '{name}' skipped: {exc}")
            log.warning("metric %s skipped: %s", name, exc)
    return outputs


def _estimates(models: list[str], outputs: dict[str, MetricOutput], resamples: list[np.ndarray], n: int, level: float):
    """Point estimate and replicates for every (model, submetric) that has values; submetrics in metric order."""
    submetrics: list[SubMetric] = []
    estimates: dict[str, dict[str, Interval]] = {m: {} for m in models}
    reps: dict[tuple[str, str], np.ndarray] = {}
    per_context: dict[str, dict[str, np.ndarray]] = {m: {} for m in models}
    for output in outputs.values():
        for sub in output.submetrics:
            for model, scores in output.scores.items():
                fn = _score_fn(scores, sub.name)
                value = fn(np.arange(n)) if fn is not None else float("nan")
                if not np.isfinite(value):
                    continue  # not applicable to this model (e.g. BLEU of the human reference)
                if sub.name in scores.per_context:
                    per_context[model][sub.name] = scores.per_context[sub.name]
                values = replicates(fn, resamples)
                if sub.bias_correct:
                    values = values - (np.nanmean(values) - value)
                    if sub.percent:  # a shifted share must stay a share
                        values = np.clip(values, 0.0, 1.0)
                reps[(model, sub.name)] = values
                estimates[model][sub.name] = percentile_interval(value, values, level)
            if any(sub.name in estimates[m] for m in models):
                submetrics.append(sub)
    return submetrics, estimates, reps, per_context


def _score_fn(scores: ModelScores, name: str):
    if name in scores.corpus:
        return scores.corpus[name]
    if name in scores.per_context:
        values = scores.per_context[name]
        return mean_fn(values) if np.any(~np.isnan(values)) else None
    return None


def headline_pair(models: list[str], wanted: tuple[str, str] | None) -> tuple[str, str] | None:
    """The comparison the report leads with: by default the last model against m0 (or the first model)."""
    if wanted is not None:
        return tuple(wanted) if set(wanted) <= set(models) else None
    generated = [m for m in models if m != HUMAN]
    if len(generated) < 2:
        return None
    base = "m0" if "m0" in generated[:-1] else generated[0]
    return generated[-1], base


def comparison_pairs(models: list[str], headline: tuple[str, str] | None) -> list[tuple[str, str]]:
    """Every pair of generated models, later minus earlier, headline first."""
    generated = [m for m in models if m != HUMAN]
    pairs = [(generated[j], generated[i]) for j in range(len(generated)) for i in range(j)]
    if headline is not None:
        pairs = [headline, *(p for p in pairs if p != headline)]
    return pairs


def _differences(pairs, submetrics, estimates, reps, level) -> list[Difference]:
    differences = []
    for a, b in pairs:
        for sub in submetrics:
            if sub.name not in estimates[a] or sub.name not in estimates[b]:
                continue
            delta = estimates[a][sub.name].value - estimates[b][sub.name].value
            interval = percentile_interval(delta, reps[(a, sub.name)] - reps[(b, sub.name)], level)
            differences.append(Difference(a, b, sub.name, interval, sub.higher_is_better))
    return differences


def _win_rate(a: str, b: str, values: np.ndarray, resamples, level: float) -> WinRate:
    fn = mean_fn(values)
    interval = percentile_interval(fn(np.arange(len(values))), replicates(fn, resamples), level)
    valid = values[~np.isnan(values)]
    return WinRate(
        a, b, interval, int(valid.size), int((valid > 0.5).sum()), int((valid == 0.5).sum()), int((valid < 0.5).sum())
    )
