"""Personalisation (situation identification, discrepancy, one-size-fits-all), reflection matching, proxy rules."""

from __future__ import annotations

import numpy as np
import pytest

from esc_evolve.evaluation.evaluate import evaluate
from esc_evolve.evaluation.matching import label_matches
from esc_evolve.evaluation.metrics.personalisation import distractor_sets, situation_ranks
from esc_evolve.evaluation.metrics.unhelpful import is_generic, is_repetitive
from esc_evolve.evaluation.settings import EvaluationSettings
from esc_evolve.text import is_empty
from tests.eval_fixtures import HashEmbedder, make_table


def test_distractors_come_from_other_conversations_and_are_seeded():
    situations = ["s0", "s0", "s1", "s2", "s3", None]
    groups = [0, 0, 1, 2, 3, 4]
    sets, k = distractor_sets(situations, groups, k=2, seed=1)
    assert k == 2
    assert sets[0][0] == "s0" and len(sets[0]) == 3 and "s0" not in sets[0][1:]
    assert sets[5] == []  # no gold situation: not scored
    assert distractor_sets(situations, groups, k=2, seed=1)[0] == sets
    assert distractor_sets(situations, groups, k=10, seed=1)[1] == 3  # capped by the distinct situations available


def test_situation_ranks_hand_computed():
    pool = {"own": np.array([1.0, 0.0]), "far": np.array([0.0, 1.0]), "mid": np.array([0.6, 0.8])}
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    candidates = [["own", "far", "mid"], ["own", "far", "mid"], ["mid", "mid", "far"]]
    hit, disc = situation_ranks(vectors, candidates, pool)
    assert hit[0] == 1.0 and disc[0] == 0.0  # own situation is the closest
    assert hit[1] == 0.0 and disc[1] == 1.0  # own situation is the farthest of 3
    assert hit[2] == pytest.approx(0.5) and disc[2] == pytest.approx(0.25)  # tied with one distractor
    hit, disc = situation_ranks(np.zeros((1, 2)), [["own", "far", "mid"]], pool)
    assert hit[0] == pytest.approx(1 / 3) and disc[0] == pytest.approx(0.5)  # no information: chance level


def test_personalisation_metric_orders_generic_and_personal_models():
    table = make_table(6, 2)
    settings = EvaluationSettings(
        metrics=["personalisation", "reflection"], bootstrap_samples=50, situation_distractors=3
    )
    result = evaluate(table, settings, embedder=HashEmbedder())
    est = result.estimates
    assert est["m0"]["one_size_fits_all"].value == pytest.approx(1.0)  # the same sentence to everyone
    assert est["m1"]["one_size_fits_all"].value < 0.9
    assert est["m1"]["preference_discrepancy"].value < est["m0"]["preference_discrepancy"].value
    assert est["m1"]["situation_id"].value > est["m0"]["situation_id"].value
    assert est["m2"]["situation_match"].value == pytest.approx(1.0)  # reflections quote the situation
    assert "situation_match" not in est["m1"]
    assert result.info["personalisation"]["chance_situation_id"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("inferred", "gold", "kind", "expected"),
    [
        ("Anxiety", "anxiety", "emotion", True),
        ("anxious and tired", "anxiety", "emotion", True),
        ("anxeity", "anxiety", "emotion", True),
        ("sad", "anxiety", "emotion", False),
        ("made a mistake", "anger", "emotion", False),
        ("she lost her job", "job crisis", "problem", True),
        ("Job Crisis", "job crisis", "problem", True),
        ("trouble with her boyfriend", "breakup with partner", "problem", True),
        ("exam stress", "job crisis", "problem", False),
        (None, "anxiety", "emotion", None),
        ("sad", None, "emotion", None),
    ],
)
def test_label_matching(inferred, gold, kind, expected):
    assert label_matches(inferred, gold, kind) is expected


def test_reflection_metric():
    table = make_table(3, 1)
    result = evaluate(table, EvaluationSettings(metrics=["reflection"], bootstrap_samples=20), embedder=HashEmbedder())
    assert result.estimates["m2"]["emotion_match"].value == 1.0
    assert result.estimates["m2"]["reflection_coverage"].value == 1.0
    assert "emotion_match" not in result.estimates["m1"]


def test_unhelpful_rules():
    assert is_empty("  ... ")
    assert is_generic("I'm so sorry to hear that.")
    assert is_generic("I understand. That must be really hard for you.")
    assert not is_generic("I'm sorry to hear that you lost your job last week.")
    assert is_repetitive("I'm so sorry to hear that. " * 8)
    assert not is_repetitive("What happened at work? Did you talk to your manager?")


def test_unhelpful_proxy_metric():
    table = make_table(6, 1)
    settings = EvaluationSettings(metrics=["unhelpful_proxy"], bootstrap_samples=20)
    est = evaluate(table, settings, embedder=HashEmbedder()).estimates
    assert est["base"]["unhelpful_proxy"].value == 1.0 and est["base"]["proxy_repetitive"].value == 1.0
    assert est["m0"]["proxy_generic"].value == 1.0
    assert est["m1"]["unhelpful_proxy"].value == 0.0


def test_one_size_fits_all_weights_match_the_resampled_pairs():
    from esc_evolve.evaluation.metrics.personalisation import _generic_fn

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(7, 4))
    similarity = vectors @ vectors.T
    conv = np.array([0, 0, 1, 2, 2, 2, 3])
    idx = np.array([0, 0, 1, 3, 5, 6, 6, 2])  # duplicates, as in a bootstrap resample
    sub = similarity[np.ix_(idx, idx)]
    mask = conv[idx][:, None] != conv[idx][None, :]
    assert _generic_fn(similarity, conv)(idx) == pytest.approx(sub[mask].mean())
