"""Personalisation and preference discrepancy. The gold profile never enters a prompt: it is used here only.

- situation_id: does the response's embedding rank its own seeker's situation (the ESConv `situation` text)
  first among 1 + K candidates (K distractor situations of other conversations, fixed per context by the seed,
  identical for every model)? Ties count as 1/(number tied). Chance = 1/(K+1).
- preference_discrepancy: (rank of the own situation - 1) / K, rank 1 = most similar, ties averaged. In [0, 1];
  0 = the response is closer to its own seeker's situation than to any other; chance level 0.5.
- one_size_fits_all: mean cosine similarity between a model's responses to different conversations' seekers
  (pairs from the same conversation excluded). Higher = more generic. In [-1, 1].
The same identification of a reflected situation is the reflection metric's `situation_match` (with the
candidates of `situation_candidates`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from esc_evolve.evaluation.registry import MetricOutput, ModelScores, SubMetric, register_metric
from esc_evolve.evaluation.resources import EvalContext

SUBMETRICS = [
    SubMetric("situation_id", "response picks its own seeker's situation among K+1 (accuracy)", percent=True),
    SubMetric("preference_discrepancy", "normalised rank of the own situation (0 best, chance 0.5)", False),
    SubMetric("one_size_fits_all", "mean cosine between responses to different seekers (generic = high)", False),
]


@register_metric("personalisation")
def personalisation(ctx: EvalContext) -> MetricOutput:
    table = ctx.table
    candidates = situation_candidates(ctx)
    conv = np.array(table.conversation_groups())
    scores = {}
    for model in table.models:
        vectors = ctx.embed(table.responses[model])
        hit, disc = situation_ranks(vectors, candidates.sets, candidates.vectors)
        scores[model] = ModelScores(
            per_context={
                "situation_id": hit,
                "preference_discrepancy": disc,
            },
            corpus={"one_size_fits_all": _generic_fn(vectors @ vectors.T, conv)},
        )
    k = candidates.k
    info = {
        "distractors": k,
        "chance_situation_id": 1 / (k + 1) if k else None,
        "contexts_with_situation": sum(1 for c in candidates.sets if c),
    }
    return MetricOutput(SUBMETRICS, scores, info)


@dataclass(frozen=True)
class SituationCandidates:
    """Per context, its own seeker's situation and K distractors ([] where the gold is missing), and their
    embeddings: the same for every model and every metric that identifies situations."""

    sets: list[list[str]]
    k: int
    vectors: dict[str, np.ndarray]


def situation_candidates(ctx: EvalContext) -> SituationCandidates:
    """The candidates of `ctx.table`, drawn with `ctx.settings.seed` (`situation_distractors` per context)."""
    table = ctx.table
    sets, k = distractor_sets(
        [s.profile.situation for s in table.samples],
        table.conversation_groups(),
        ctx.settings.situation_distractors,
        ctx.settings.seed,
    )
    pool = sorted({s for row in sets for s in row})
    vectors = dict(zip(pool, ctx.embed(pool), strict=True)) if pool else {}
    return SituationCandidates(sets, k, vectors)


def distractor_sets(situations: list[str | None], groups: list[int], k: int, seed: int) -> tuple[list[list[str]], int]:
    """Per context: [own situation, K distractors from other conversations] ([] where the gold is missing).

    K is capped by the number of distinct situations of other conversations in the table (reported)."""
    by_group: dict[int, str] = {}
    for situation, group in zip(situations, groups, strict=True):
        if situation:
            by_group.setdefault(group, situation)
    k_eff = min(k, max(len(set(by_group.values())) - 1, 0))
    rng = np.random.default_rng(seed)
    sets: list[list[str]] = []
    for situation, group in zip(situations, groups, strict=True):
        others = sorted({s for g, s in by_group.items() if g != group and s != situation})
        if not situation or len(others) < k_eff or k_eff == 0:
            sets.append([])
            continue
        chosen = rng.choice(len(others), size=k_eff, replace=False)
        sets.append([situation, *(others[i] for i in sorted(chosen))])
    return sets, k_eff


def situation_ranks(
    vectors: np.ndarray, candidates: list[list[str]], pool_vectors: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(identification credit, normalised rank) per context; NaN where there are no candidates."""
    hit = np.full(len(candidates), np.nan)
    disc = np.full(len(candidates), np.nan)
    for i, cands in enumerate(candidates):
        if not cands:
            continue
        sims = np.stack([pool_vectors[c] for c in cands]) @ vectors[i]
        own, others = sims[0], sims[1:]
        above, tied = np.sum(others > own + 1e-9), np.sum(np.abs(others - own) <= 1e-9)
        hit[i] = 1.0 / (1 + tied) if above == 0 else 0.0
        disc[i] = (above + tied / 2) / len(others)
    return hit, disc


def _generic_fn(similarity: np.ndarray, conv: np.ndarray):
    """Mean similarity over resampled pairs from different conversations, via context weights (a context drawn
    k times counts k times): (w'Sw - sum over conversations c of w_c'S_cc w_c) / (W^2 - sum_c W_c^2)."""
    blocks = [(b, similarity[np.ix_(b, b)]) for b in (np.flatnonzero(conv == c) for c in np.unique(conv))]

    def fn(idx: np.ndarray) -> float:
        w = np.bincount(idx, minlength=len(conv)).astype(float)
        total = w @ similarity @ w
        within = sum(w[b] @ block @ w[b] for b, block in blocks)
        pairs = w.sum() ** 2 - sum(w[b].sum() ** 2 for b, _ in blocks)
        return float((total - within) / pairs) if pairs > 0 else float("nan")

    return fn
