"""Where a model wrote an explicit reflection, how often what it inferred matches the gold profile.

- reflection_coverage: share of contexts with a reflection.
- emotion_match / problem_match: the inferred emotion / problem names the gold label (`matching.label_matches`).
- situation_match: the reflected situation identifies the seeker's own situation among `situation_distractors`
  other seekers' situations by embedding similarity (the personalisation metric's identification, ties count
  1/(number tied); chance 1/(K+1)).

Contexts without a reflection, without the inferred field or without the gold label are excluded (NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from esc_evolve.evaluation.matching import label_matches
from esc_evolve.evaluation.metrics.personalisation import SituationCandidates, situation_candidates, situation_ranks
from esc_evolve.evaluation.registry import MetricOutput, ModelScores, SubMetric, register_metric
from esc_evolve.evaluation.resources import EvalContext

SUBMETRICS = [
    SubMetric("reflection_coverage", "contexts with an explicit reflection", higher_is_better=None, percent=True),
    SubMetric("emotion_match", "reflected emotion matches the gold emotion type", percent=True),
    SubMetric("problem_match", "reflected problem matches the gold problem type", percent=True),
    SubMetric("situation_match", "reflected situation picks the gold one among K+1 seekers' (accuracy)", percent=True),
]


@register_metric("reflection")
def reflection(ctx: EvalContext) -> MetricOutput:
    models = [m for m in ctx.table.models if ctx.table.has_reflections(m)]
    candidates = _candidates(ctx, models)
    profiles = [s.profile for s in ctx.table.samples]
    scores = {}
    for model in models:
        rows = ctx.table.reflections[model]
        emotion = [
            label_matches(r.emotion if r else None, p.emotion_type, "emotion")
            for r, p in zip(rows, profiles, strict=True)
        ]
        problem = [
            label_matches(r.problem if r else None, p.problem_type, "problem")
            for r, p in zip(rows, profiles, strict=True)
        ]
        situation = np.full(len(rows), np.nan)
        if candidates is not None:
            situation = identify_situations(ctx, [r.situation if r else None for r in rows], candidates)
        scores[model] = ModelScores(
            per_context={
                "reflection_coverage": np.array([float(r is not None) for r in rows]),
                "emotion_match": _as_float(emotion),
                "problem_match": _as_float(problem),
                "situation_match": situation,
            }
        )
    info = {"distractors": candidates.k} if candidates is not None else {}
    return MetricOutput(SUBMETRICS, scores, info)


def _candidates(ctx: EvalContext, models: list[str]) -> SituationCandidates | None:
    """The situations to identify, or None when no model reflected on a situation (nothing to embed then)."""
    reflected = any(r is not None and (r.situation or "").strip() for m in models for r in ctx.table.reflections[m])
    return situation_candidates(ctx) if reflected else None


def identify_situations(ctx: EvalContext, texts: Sequence[str | None], candidates: SituationCandidates) -> np.ndarray:
    """Identification credit per context of reflected situations: does the text's embedding pick the own
    situation among the candidates? NaN where the text is missing or blank, or the context has no gold one."""
    n = len(candidates.sets)
    cleaned = [(t or "").strip() for t in texts]
    keep = [i for i, t in enumerate(cleaned) if t and candidates.sets[i]]
    if not keep:
        return np.full(n, np.nan)
    embedded = ctx.embed([cleaned[i] for i in keep])
    vectors = np.zeros((n, embedded.shape[1]))
    vectors[keep] = embedded
    kept = set(keep)
    masked = [c if i in kept else [] for i, c in enumerate(candidates.sets)]
    return situation_ranks(vectors, masked, candidates.vectors)[0]


def _as_float(values: list[bool | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values])
