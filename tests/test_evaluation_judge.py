"""LLM-judge prompts, robust parsing (garbage included) and the judge metric with fake judges."""

from __future__ import annotations

import json

import numpy as np
import pytest

from esc_evolve.evaluation.evaluate import evaluate
from esc_evolve.evaluation.judge import (
    DIMENSIONS,
    PAIRWISE_PROMPT,
    POINTWISE_PROMPT,
    load_prompt,
    parse_pairwise,
    parse_pointwise,
)
from esc_evolve.evaluation.metrics.judge import judge_pairs
from esc_evolve.evaluation.settings import EvaluationSettings
from tests.eval_fixtures import HashEmbedder, fake_judge, make_table

FULL = {"empathy": 4, "personalisation": 3, "helpfulness": 2, "fluency": 5, "safety": 5}


def test_prompts_are_versioned_and_filled():
    for name in (POINTWISE_PROMPT, PAIRWISE_PROMPT):
        prompt = load_prompt(name)
        assert name.endswith("_v1.md") and len(prompt.sha256) == 16
        assert "{{context}}" in prompt.user and "JSON" in prompt.system
    messages = load_prompt(POINTWISE_PROMPT).messages(background="b", context="c", response="r")
    assert [m["role"] for m in messages] == ["system", "user"] and "{{" not in messages[1]["content"]


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(FULL),
        "Here is my rating:\n```json\n" + json.dumps(FULL) + "\n```\nHope this helps!",
        "Empathy: 4\nPersonalization - 3/5\nHelpfulness: 2\nFluency: 5\nSafety: 5",
        '{"Empathy": "4", "personalization": 3, "helpfulness": 2.0, "fluency": 5, "safety": "5/5"}',
    ],
)
def test_pointwise_parses_well_formed_and_wrapped_output(text):
    scores, status = parse_pointwise(text)
    assert status == "ok"
    assert scores == {k: float(v) for k, v in FULL.items()}


@pytest.mark.parametrize(
    ("text", "status", "n"),
    [
        ('{"empathy": 4, "helpfulness": 2', "partial", 2),  # truncated JSON: the regex still reads two scores
        ('{"empathy": 9, "personalisation": 0}', "failed", 0),  # out of range
        ("I cannot rate this conversation.", "failed", 0),
        ("", "failed", 0),
        ("\x00\x01 }{ ]] garbage {{{", "failed", 0),
    ],
)
def test_pointwise_partial_and_garbage(text, status, n):
    scores, got = parse_pointwise(text)
    assert got == status and len(scores) == n
    assert set(scores) <= set(DIMENSIONS)


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ('{"winner": "B"}', "B"),
        ('Let me think. Both are kind. {"winner": "tie"}', "tie"),
        ("[[A]]", "A"),
        ("Final verdict: [[C]]", "tie"),
        ("The winner is Response B.", "B"),
        ("A", "A"),
        ("**B**", "B"),
    ],
)
def test_pairwise_parsing(text, verdict):
    assert parse_pairwise(text) == (verdict, "ok")


@pytest.mark.parametrize("text", ["", "I like A but B is also good", "[[A]] no wait [[B]]", '{"winner": "X"}', "??"])
def test_pairwise_garbage_fails(text):
    assert parse_pairwise(text) == (None, "failed")


def test_judge_metric_scores_and_win_rates(tmp_path):
    table = make_table(4, 1)
    settings = EvaluationSettings(metrics=["judge"], bootstrap_samples=50, judge_pairs=[("m1", "m0")])
    result = evaluate(table, settings, embedder=HashEmbedder(), judge=fake_judge, out_dir=tmp_path)
    assert result.estimates["m1"]["judge_helpfulness"].value == 5.0
    assert result.estimates["m0"]["unhelpful_judge"].value == 1.0
    (win,) = result.win_rates
    assert (win.a, win.b, win.wins, win.losses, win.interval.value) == ("m1", "m0", 4, 0, 1.0)
    assert win.significant
    records = (tmp_path / "judge_records.jsonl").read_text().splitlines()
    assert len(records) == 4 * len(table.models) + 4 * 2
    assert result.info["judge"]["position_consistency"]["m1 vs m0"] == 1.0


def test_judge_failures_are_counted_not_dropped():
    calls = {"n": 0}

    def flaky(messages):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise TimeoutError("backend timed out")
        return "no idea" if calls["n"] % 3 == 1 else '{"empathy": 3}'

    table = make_table(3, 1)
    settings = EvaluationSettings(metrics=["judge"], bootstrap_samples=20, judge_pairs=[])
    result = evaluate(table, settings, embedder=HashEmbedder(), judge=flaky)
    counts = result.info["judge"]["status_counts"]
    assert sum(counts.values()) == 3 * len(table.models)
    assert counts["pointwise:error"] > 0 and counts["pointwise:failed"] > 0 and counts["pointwise:partial"] > 0
    assert np.isnan(result.per_context["base"]["judge_empathy"]).any()


def test_position_biased_judge_gives_ties():
    table = make_table(3, 1)
    settings = EvaluationSettings(metrics=["judge"], bootstrap_samples=20, judge_pairs=[("m2", "m0")])
    result = evaluate(table, settings, embedder=HashEmbedder(), judge=lambda m: '{"winner": "A"}')
    (win,) = result.win_rates
    assert win.interval.value == 0.5 and win.ties == 3 and not win.significant
    assert result.info["judge"]["position_consistency"]["m2 vs m0"] == 0.0


def test_no_judge_is_a_note():
    result = evaluate(make_table(2, 1), EvaluationSettings(metrics=["judge"], bootstrap_samples=20))
    assert any("judge skipped" in n for n in result.notes)


def test_default_judge_pairs():
    assert judge_pairs(["base", "m0", "m1", "m2", "human"], None) == [
        ("m0", "base"),
        ("m1", "m0"),
        ("m2", "m1"),
        ("m2", "m0"),
    ]
    with pytest.raises(ValueError):
        judge_pairs(["m0"], [("m0", "m9")])
