"""Where a model wrote an explicit reflection, how often its inferred emotion and problem match the gold labels
(`matching.label_matches`). Contexts without a reflection (or without the gold label) are excluded (NaN)."""

from __future__ import annotations

import numpy as np

from esc_evolve.evaluation.matching import label_matches
from esc_evolve.evaluation.registry import MetricOutput, ModelScores, SubMetric, register_metric
from esc_evolve.evaluation.resources import EvalContext

SUBMETRICS = [
    SubMetric("reflection_coverage", "contexts with an explicit reflection", higher_is_better=None, percent=True),
    SubMetric("emotion_match", "reflected emotion matches the gold emotion type", percent=True),
    SubMetric("problem_match", "reflected problem matches the gold problem type", percent=True),
]


@register_metric("reflection")
def reflection(ctx: EvalContext) -> MetricOutput:
    scores = {}
    for model in ctx.table.models:
        if not ctx.table.has_reflections(model):
            continue
        rows = ctx.table.reflections[model]
        profiles = [s.profile for s in ctx.table.samples]
        emotion = [
            label_matches(r.emotion if r else None, p.emotion_type, "emotion")
            for r, p in zip(rows, profiles, strict=True)
        ]
        problem = [
            label_matches(r.problem if r else None, p.problem_type, "problem")
            for r, p in zip(rows, profiles, strict=True)
        ]
        scores[model] = ModelScores(
            per_context={
                "reflection_coverage": np.array([float(r is not None) for r in rows]),
                "emotion_match": _as_float(emotion),
                "problem_match": _as_float(problem),
            }
        )
    return MetricOutput(SUBMETRICS, scores)


def _as_float(values: list[bool | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values])
