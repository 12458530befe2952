"""LLM-judge prompts, robust parsing (garbage included) and the judge metric with fake judges."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from esc_evolve.evaluation.evaluate import evaluate
from esc_evolve.evaluation.judge import (
    DIMENSIONS,
    PAIRWISE_PROMPT,
    POINTWISE_PROMPT,
    CallableJudge,
    Judge,
    judge_calls,
    load_prompt,
    parse_pairwise,
    parse_pointwise,
    pointwise_call,
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
    settings = EvaluationSettings(metrics=["judge"], bootstrap_samples=50, judge={"pairs": [("m1", "m0")]})
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
    settings = EvaluationSettings(metrics=["judge"], bootstrap_samples=20, judge={"pairs": []})
    result = evaluate(table, settings, embedder=HashEmbedder(), judge=flaky)
    counts = result.info["judge"]["status_counts"]
    assert sum(counts.values()) == 3 * len(table.models)
    assert counts["pointwise:error"] > 0 and counts["pointwise:failed"] > 0 and counts["pointwise:partial"] > 0
    assert np.isnan(result.per_context["base"]["judge_empathy"]).any()


def test_position_biased_judge_gives_ties():
    table = make_table(3, 1)
    settings = EvaluationSettings(metrics=["judge"], bootstrap_samples=20, judge={"pairs": [("m2", "m0")]})
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


# ---------------------------------------------------------------------------------------------------------
# Batched judging: same records as one call per prompt, few batched calls, errors kept per prompt

POINTWISE_ANSWERS = [
    json.dumps(FULL),
    "Empathy: 4\nHelpfulness - 1/5",  # partial
    "\x00\x01 }{ ]] garbage {{{",
    "Sure!\n```json\n" + json.dumps({**FULL, "helpfulness": 5}) + "\n```",
    "",
]
PAIRWISE_ANSWERS = ['{"winner": "A"}', "[[B]]", "tie", "[[A]] no wait [[B]]", "The winner is Response A."]


class ScriptedJudge(Judge):
    """Canned answers that depend only on the prompt (garbage included); prompts whose crc32 is divisible by
    `fail_every` raise, alone or in any batch that holds them, as a real backend's too-long prompt. A batch of
    several prompts can also fail as a whole (`batch_fails`, e.g. out of memory) or answer one text too few."""

    description = "scripted test judge"

    def __init__(self, fail_every: int = 0, batch_fails: bool = False, short_batch: bool = False) -> None:
        self.fail_every, self.batch_fails, self.short_batch = fail_every, batch_fails, short_batch
        self.calls: list[int] = []  # len(prompts) per ask

    def answer(self, messages):
        user = messages[-1]["content"]
        key = zlib.crc32(user.encode())
        if self.fail_every and key % self.fail_every == 0:
            raise ValueError(f"prompt {key} is too long")
        answers = PAIRWISE_ANSWERS if "Response A:" in user else POINTWISE_ANSWERS
        return answers[key % len(answers)]

    def __call__(self, messages):  # the plain-function view: one prompt, one answer
        self.calls.append(1)
        return self.answer(messages)

    def ask(self, prompts):
        self.calls.append(len(prompts))
        if self.batch_fails and len(prompts) > 1:
            raise RuntimeError("out of memory")
        answers = [self.answer(m) for m in prompts]
        return answers[:-1] if self.short_batch and len(prompts) > 1 else answers


def _run_judge(judge, tmp_path, name):
    table = make_table(5, 2)  # 10 contexts, 5 models (human too), default pairs: 50 pointwise + 4 x 10 x 2 pairwise
    settings = EvaluationSettings(metrics=["judge"], bootstrap_samples=20)
    out = tmp_path / name
    result = evaluate(table, settings, embedder=HashEmbedder(), judge=judge, out_dir=out)
    return result, (out / "judge_records.jsonl").read_text()


def _assert_same_results(batched, one_by_one):
    (a, records_a), (b, records_b) = batched, one_by_one
    assert records_a == records_b
    assert {**a.info["judge"], "backend": None} == {**b.info["judge"], "backend": None}  # only the names differ
    for model, values in b.per_context.items():
        for name, array in values.items():
            np.testing.assert_array_equal(a.per_context[model][name], array)
    assert [(w.a, w.b, w.wins, w.losses, w.ties, w.interval.value) for w in a.win_rates] == [
        (w.a, w.b, w.wins, w.losses, w.ties, w.interval.value) for w in b.win_rates
    ]


def test_batched_judge_gives_the_one_by_one_records_in_few_calls(tmp_path, monkeypatch):
    plain = ScriptedJudge()
    one_by_one = _run_judge(lambda m: plain(m), tmp_path, "plain")  # a plain function: once per prompt
    total = len(plain.calls)
    assert total == 50 + 80 and set(plain.calls) == {1}
    statuses = one_by_one[0].info["judge"]["status_counts"]
    assert {"pointwise:ok", "pointwise:partial", "pointwise:failed", "pairwise:ok", "pairwise:failed"} <= set(statuses)

    scripted = ScriptedJudge()
    _assert_same_results(_run_judge(scripted, tmp_path, "batched"), one_by_one)
    assert scripted.calls == [total]  # every prompt in one batched call

    monkeypatch.setattr("esc_evolve.evaluation.judge.asking.BATCH_CHUNK", 32)
    chunked = ScriptedJudge()
    _assert_same_results(_run_judge(chunked, tmp_path, "chunked"), one_by_one)
    assert chunked.calls == [32, 32, 32, 32, 2]


def test_failing_batches_fall_back_and_record_errors_per_prompt(tmp_path, monkeypatch):
    monkeypatch.setattr("esc_evolve.evaluation.judge.asking.BATCH_CHUNK", 32)
    plain = ScriptedJudge(fail_every=7)
    one_by_one = _run_judge(lambda m: plain(m), tmp_path, "plain")
    errors = [json.loads(line) for line in one_by_one[1].splitlines() if '"status": "error"' in line]
    assert 0 < len(errors) < 30 and all(e["error"].startswith("ValueError: prompt ") for e in errors)

    scripted = ScriptedJudge(fail_every=7)  # a batch that holds a failing prompt raises: halved until it is alone
    _assert_same_results(_run_judge(scripted, tmp_path, "batched"), one_by_one)
    assert sum(scripted.calls) < 4 * len(plain.calls) and len(scripted.calls) < len(plain.calls)
    assert max(scripted.calls) == 32

    for broken in (ScriptedJudge(fail_every=7, batch_fails=True), ScriptedJudge(fail_every=7, short_batch=True)):
        _assert_same_results(_run_judge(broken, tmp_path, "broken"), one_by_one)  # every prompt ends up alone


def test_callable_judge_asks_once_per_prompt_in_order():
    seen = []

    def fn(messages):
        seen.append(messages[-1]["content"])
        return len(seen)  # not a str: answers are turned into text

    judge = CallableJudge(fn, description="counting judge")
    prompts = [[{"role": "user", "content": f"p{i}"}] for i in range(3)]
    assert judge.ask(prompts) == ["1", "2", "3"] and seen == ["p0", "p1", "p2"]
    assert judge.description == "counting judge" and judge.chunk_size == 1
    with judge as same:  # a context manager, like every judge
        assert same is judge


def test_callable_judge_errors_are_recorded_per_prompt_and_never_retried():
    table = make_table(2, 1)
    calls = [pointwise_call(table.samples[i], m, table.responses[m][i]) for m in ("m0", "m1") for i in range(2)]
    asked = []

    def fn(messages):
        asked.append(messages)
        if len(asked) == 2:
            raise TimeoutError("slow")
        return '{"empathy": 3}'

    records = judge_calls(CallableJudge(fn), calls)
    assert len(asked) == 4  # the failure is not asked again
    assert [r.status for r in records] == ["partial", "error", "partial", "partial"]
    assert records[1].error == "TimeoutError: slow"


def test_evaluate_wraps_a_plain_function_and_names_it():
    table = make_table(2, 1)
    settings = EvaluationSettings(metrics=["judge"], bootstrap_samples=20, judge={"pairs": []})
    result = evaluate(table, settings, embedder=HashEmbedder(), judge=fake_judge)
    assert result.info["judge"]["backend"] == "a judge callable given to evaluate()"
    named = evaluate(table, settings, embedder=HashEmbedder(), judge=CallableJudge(fake_judge, "my judge"))
    assert named.info["judge"]["backend"] == "my judge"
    assert (
        named.per_context["m1"]["judge_helpfulness"].tolist() == result.per_context["m1"]["judge_helpfulness"].tolist()
    )
