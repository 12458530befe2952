"""Strategy behaviour of each model: which of the 8 ESConv strategies its responses use (by the classifier),
how that distribution differs from the human one, and Kang et al.'s preference bias.

The gold strategy of a context is the human supporter's (TurnSample.strategy). The pseudo-model `human` runs the
classifier on the human responses themselves: its numbers are the floor that classifier noise alone produces.
"""

from __future__ import annotations

import numpy as np

from esc_evolve.data.labels import STRATEGIES
from esc_evolve.evaluation.registry import MetricOutput, ModelScores, SubMetric, register_metric
from esc_evolve.evaluation.resources import EvalContext
from esc_evolve.evaluation.strategy import js_divergence, preference_bias

K = len(STRATEGIES)
_INDEX = {s: i for i, s in enumerate(STRATEGIES)}

SUBMETRICS = [
    SubMetric("strategy_match", "response strategy (classified) = the human's gold strategy", percent=True),
    SubMetric("strategy_f1", "macro-F1 of classified vs gold strategy (Kang et al.'s proficiency Q)", percent=True),
    SubMetric("strategy_jsd", "Jensen-Shannon divergence (bits) of the strategy distribution from gold", False),
    SubMetric("preference_bias", "Kang et al.'s preference bias B (std of Bradley-Terry preferences)", False),
]


@register_metric("strategy")
def strategy(ctx: EvalContext) -> MetricOutput:
    gold = np.array([_INDEX.get(s.strategy, -1) if s.strategy else -1 for s in ctx.table.samples])
    classifier = ctx.classifier
    scores, info = {}, {"gold_distribution": _distribution(gold), "models": {}, "classifier": classifier.report}
    for model in ctx.table.models:
        labels = classifier.predict_vectors(ctx.embed(ctx.table.responses[model]))
        pred = np.array([_INDEX[s] for s in labels])
        match = np.where(gold >= 0, (pred == gold).astype(float), np.nan)
        bias = preference_bias(_confusion(gold, pred), ctx.settings.bias_pseudo_count)
        scores[model] = ModelScores(
            per_context={"strategy_match": match},
            corpus={
                "strategy_f1": lambda idx, p=pred: _macro_f1(gold[idx], p[idx]),
                "strategy_jsd": lambda idx, p=pred: _jsd(gold[idx], p[idx]),
                "preference_bias": _bias_fn(gold, pred, ctx.settings.bias_pseudo_count, bias.strengths),
            },
        )
        info["models"][model] = {
            "predicted": [STRATEGIES[i] for i in pred],
            "distribution": _distribution(pred),
            "preferences": bias.preferences,
            "strongly_connected": bias.strongly_connected,
        }
    return MetricOutput(SUBMETRICS, scores, info)


def _distribution(indices: np.ndarray) -> dict[str, int]:
    counts = np.bincount(indices[indices >= 0], minlength=K)
    return dict(zip(STRATEGIES, counts.tolist(), strict=True))


def _confusion(gold: np.ndarray, pred: np.ndarray) -> np.ndarray:
    keep = gold >= 0
    return np.bincount(gold[keep] * K + pred[keep], minlength=K * K).reshape(K, K).astype(float)


def _macro_f1(gold: np.ndarray, pred: np.ndarray) -> float:
    """Macro-F1 over the labels present in gold or prediction (scikit-learn's default label set)."""
    c = _confusion(gold, pred)
    tp, support, predicted = np.diag(c), c.sum(axis=1), c.sum(axis=0)
    present = (support + predicted) > 0
    if not present.any():
        return float("nan")
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros(K), where=present)
    return float(f1[present].mean())


def _jsd(gold: np.ndarray, pred: np.ndarray) -> float:
    keep = gold >= 0
    return js_divergence(np.bincount(pred[keep], minlength=K), np.bincount(gold[keep], minlength=K))


def _bias_fn(gold: np.ndarray, pred: np.ndarray, pseudo_count: float, start: np.ndarray):
    """B on resampled contexts; each fit warm-starts from the full-data strengths (same optimum, fewer steps)."""

    def fn(idx: np.ndarray) -> float:
        confusion = _confusion(gold[idx], pred[idx])
        return preference_bias(confusion, pseudo_count, init=start, check_connectivity=False).bias

    return fn
