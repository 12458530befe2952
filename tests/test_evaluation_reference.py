"""Reference-based metrics against hand-computed values (BLEU, ROUGE-L, Distinct, length, tokenisation)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from esc_evolve.evaluation.evaluate import evaluate
from esc_evolve.evaluation.metrics.reference import (
    bleu_from_statistics,
    bleu_statistics,
    corpus_bleu_nltk,
    distinct_n,
)
from esc_evolve.evaluation.responses import ResponseRow, build_table
from esc_evolve.evaluation.settings import EvaluationSettings
from esc_evolve.text import repeated_ngram_share, tokenize, words
from tests.eval_fixtures import HashEmbedder, make_sample

HYP = "the cat sat on the mat"
REF = "the cat is on the mat"


def test_tokenize_and_words():
    assert tokenize("I\u2019m fine, THANKS!") == ["i'm", "fine", ",", "thanks", "!"]
    assert words("I'm fine, thanks!") == ["i'm", "fine", "thanks"]
    assert words("  ... ") == []


def test_bleu_hand_computed():
    # unigram 5/6, bigram 3/5, trigram 1/4, 4-gram 0/3 -> smoothed 0.1/3; equal lengths -> no brevity penalty
    b1, b2, b3, b4 = corpus_bleu_nltk([HYP], [REF])
    assert b1 == pytest.approx(5 / 6)
    assert b2 == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert b3 == pytest.approx(0.5)
    assert b4 == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25)


def test_bleu_statistics_match_nltk_on_a_corpus():
    hyps = [HYP, "hello", "i am so sorry to hear that", "", "what happened at work today ?"]
    refs = [REF, "hello there friend", "sorry to hear that , what happened ?", "okay", "what happened today ?"]
    total = np.sum([bleu_statistics(h, r) for h, r in zip(hyps, refs, strict=True)], axis=0)
    for order, expected in enumerate(corpus_bleu_nltk(hyps, refs), start=1):
        assert bleu_from_statistics(total, order) == pytest.approx(expected)


def test_bleu_brevity_penalty_and_zero():
    total = bleu_statistics("the cat", "the cat sat on the mat")
    assert bleu_from_statistics(total, 1) == pytest.approx(math.exp(1 - 6 / 2))
    assert bleu_from_statistics(bleu_statistics("dog", "cat"), 2) == 0.0


def test_distinct_corpus_level_and_resampling():
    assert distinct_n(["a b a", "a c"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["a b a", "a c"], 2) == pytest.approx(1.0)
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)


def test_repeated_ngram_share():
    assert repeated_ngram_share(["a", "b", "c", "d"], 3) == 0.0
    assert repeated_ngram_share(["a", "b", "c", "a", "b", "c", "a", "b", "c"], 3) == pytest.approx(4 / 7)


def _table(hyps: list[str], refs: list[str]):
    samples = [make_sample(i, 1, response=r) for i, r in enumerate(refs)]
    rows = [
        ResponseRow(sample_id=s.sample_id, model="m", response=h, sample=s) for s, h in zip(samples, hyps, strict=True)
    ]
    return build_table(rows)


def test_registered_metrics_through_evaluate():
    table = _table([HYP, "I'm fine, thanks!"], [REF, "fine thanks"])
    settings = EvaluationSettings(metrics=["bleu", "rouge_l", "distinct", "length"], bootstrap_samples=50)
    result = evaluate(table, settings, embedder=HashEmbedder())
    est = result.estimates["m"]
    assert est["bleu_1"].value == pytest.approx(corpus_bleu_nltk([HYP, "I'm fine, thanks!"], [REF, "fine thanks"])[0])
    # ROUGE-L: LCS "the cat on the mat" = 5 of 6 both ways -> F 5/6; second pair: rouge-score splits "i'm" into
    # "i m", so LCS "fine thanks" = 2 of (4 hyp, 2 ref) -> P 1/2, R 1 -> F 2/3
    assert est["rouge_l"].value == pytest.approx((5 / 6 + 2 / 3) / 2)
    assert est["length"].value == pytest.approx((6 + 3) / 2)
    assert "bleu_1" not in result.estimates["human"]  # the reference is not scored against itself
    assert est["bleu_1"].low <= est["bleu_1"].value <= est["bleu_1"].high


def test_an_unknown_metric_names_the_setting_and_the_registered_ones():
    from esc_evolve.errors import ConfigError
    from esc_evolve.evaluation import available_metrics, get_metric

    assert {"bleu", "distinct", "reflection", "judge"} <= set(available_metrics())
    with pytest.raises(ConfigError, match=r"unknown metric 'blue' \(eval.metrics\); registered: bleu, distinct"):
        get_metric("blue")
