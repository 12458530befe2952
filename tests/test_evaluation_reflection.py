"""The reflection metric on hand-made reflections: label matches and situation identification (situation_match)."""

from __future__ import annotations

import numpy as np
import pytest

from esc_evolve.data.schema import SeekerProfile
from esc_evolve.evaluation.evaluate import evaluate
from esc_evolve.evaluation.responses import Reflection, ResponseRow, build_table
from esc_evolve.evaluation.settings import EvaluationSettings
from tests.eval_fixtures import ITER1_REFLECTIONS, SITUATIONS, HashEmbedder, make_sample, reflection_table


class NoEmbedder:
    key = "test/no-embedder"

    def encode(self, texts):
        raise AssertionError(f"nothing to embed, yet asked for {texts!r}")


def _reflection(table, embedder):
    settings = EvaluationSettings(metrics=["reflection"], bootstrap_samples=20, situation_distractors=9)
    return evaluate(table, settings, embedder=embedder)


def test_reflection_scores_on_hand_made_reflections():
    result = _reflection(reflection_table("m0", ITER1_REFLECTIONS), HashEmbedder())
    per_context = result.per_context["m0"]
    np.testing.assert_array_equal(per_context["emotion_match"], [1.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(per_context["problem_match"], [1.0, 0.0, 1.0, 0.0])
    # Context 0 and 1 quote their own situation; context 2 has none (NaN); context 3 quotes context 0's, one of its
    # 3 distractors (K capped by the 3 other conversations).
    np.testing.assert_array_equal(per_context["situation_match"], [1.0, 1.0, np.nan, 0.0])
    assert result.estimates["m0"]["situation_match"].value == pytest.approx(2 / 3)
    assert result.info["reflection"]["distractors"] == 3


def test_situation_match_needs_a_reflected_and_a_gold_situation():
    no_gold = make_sample(4, 3)
    no_gold = no_gold.model_copy(update={"profile": SeekerProfile(emotion_type="fear", situation=None)})
    samples = [*(make_sample(c, 3) for c in range(4)), no_gold]
    situations = [SITUATIONS[0][2], "   ", SITUATIONS[2][2], SITUATIONS[3][2], SITUATIONS[4][2]]
    rows = [
        ResponseRow(sample_id=s.sample_id, model="m1", response="Go on.", sample=s, reflection=Reflection(situation=x))
        for s, x in zip(samples, situations, strict=True)
    ]
    result = _reflection(build_table(rows, include_human=False), HashEmbedder())
    np.testing.assert_array_equal(result.per_context["m1"]["situation_match"], [1.0, np.nan, 1.0, 1.0, np.nan])


def test_reflections_without_a_situation_embed_nothing():
    table = reflection_table("m0", [(e, p, None) for e, p, _ in ITER1_REFLECTIONS])
    result = _reflection(table, NoEmbedder())
    assert result.estimates["m0"]["emotion_match"].value == 0.75
    assert "situation_match" not in result.estimates["m0"]
