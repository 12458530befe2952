"""Report rendering: files exist and contain the summary table, the headline, the plots, the examples and, when
given, the reflection accuracy of the self-evolution iterations."""

from __future__ import annotations

import json

import pytest

from esc_evolve.evaluation.evaluate import evaluate
from esc_evolve.evaluation.report import REFLECTION_HEADING, write_report
from esc_evolve.evaluation.settings import EvaluationSettings
from tests.eval_fixtures import (
    ITER1_REFLECTIONS,
    ITER2_REFLECTIONS,
    HashEmbedder,
    fake_judge,
    make_table,
    reflection_table,
    tiny_classifier,
)


def test_report_files(tmp_path):
    table = make_table(6, 2)
    embedder = HashEmbedder()
    settings = EvaluationSettings(bootstrap_samples=100, n_examples=2, judge={"pairs": [("m2", "m0")]})
    result = evaluate(table, settings, embedder=embedder, classifier=tiny_classifier(embedder), judge=fake_judge)
    paths = write_report(result, table, tmp_path, {"responses_file": "r.jsonl"})

    md = paths["markdown"].read_text()
    assert "## Headline: m2 vs m0" in md
    assert "| metric | better | base | m0 | m1 | m2 | human |" in md
    for metric in ("bleu_2", "rouge_l", "distinct_2", "preference_bias", "preference_discrepancy", "unhelpful_judge"):
        assert f"| {metric}" in md
    assert "![Metrics per model](plots/metrics.png)" in md
    assert "## Example responses" in md and "human (reference)" in md
    assert "Reflection accuracy" not in md  # no self-evolution iterations given

    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == len(paths["plots"]) == 5
    assert "<table>" in page and "Headline: m2 vs m0" in page
    for name in ("metrics", "win_rates", "strategies", "preferences", "lengths"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000

    data = json.loads(paths["metrics"].read_text())
    assert data["provenance"]["n_contexts"] == 12 and data["provenance"]["responses_file"] == "r.jsonl"
    assert data["provenance"]["settings"]["bootstrap_samples"] == 100
    assert "numpy" in data["provenance"]["versions"]
    diff = next(d for d in data["differences"] if (d["a"], d["b"], d["metric"]) == ("m2", "m0", "judge_helpfulness"))
    assert diff["significant"] and diff["favours"] == "m2"
    assert data["win_rates"][0]["wins"] == 12
    assert "reflection_accuracy" not in data


def test_report_html_escapes_model_output(tmp_path):
    table = make_table(2, 1)
    table.responses["m1"][0] = "<script>alert(1)</script>"
    result = evaluate(table, EvaluationSettings(metrics=["length"], bootstrap_samples=20, n_examples=2))
    page = write_report(result, table, tmp_path)["html"].read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page


def _reflection_results():
    settings = EvaluationSettings(metrics=["reflection"], bootstrap_samples=50)
    return {
        "iter1: m0 on 4 training contexts": evaluate(
            reflection_table("m0", ITER1_REFLECTIONS), settings, embedder=HashEmbedder()
        ),
        "iter2: m1 on 4 training contexts": evaluate(
            reflection_table("m1", ITER2_REFLECTIONS), settings, embedder=HashEmbedder()
        ),
    }


def test_report_shows_the_reflection_accuracy_of_each_iteration(tmp_path):
    table = make_table(2, 1)
    result = evaluate(table, EvaluationSettings(metrics=["length"], bootstrap_samples=20, n_examples=0))
    reflections = _reflection_results()
    paths = write_report(result, table, tmp_path, reflections=reflections)

    md = paths["markdown"].read_text()
    assert f"## {REFLECTION_HEADING}" in md
    header = "| iteration | reflection_coverage (%) | emotion_match (%) | problem_match (%) | situation_match (%) | n |"
    assert header in md
    (iter1,) = [line for line in md.splitlines() if line.startswith("| iter1: m0 on 4 training contexts |")]
    cells = [c.strip() for c in iter1.strip("|").split("|")]
    assert [c.split(" [")[0] for c in cells[1:]] == ["100.0", "75.0", "50.0", "66.7", "4"]
    ci = reflections["iter1: m0 on 4 training contexts"].estimates["m0"]["emotion_match"]
    assert cells[2] == f"75.0 [{100 * ci.low:.1f}, {100 * ci.high:.1f}]"
    perfect = " 100.0 [100.0, 100.0] |"
    assert "| iter2: m1 on 4 training contexts |" + perfect * 4 + " 4 |" in md
    assert REFLECTION_HEADING in paths["html"].read_text()

    accuracy = json.loads(paths["metrics"].read_text())["reflection_accuracy"]
    assert list(accuracy) == list(reflections)
    first = accuracy["iter1: m0 on 4 training contexts"]
    assert set(first) == {"reflection_coverage", "emotion_match", "problem_match", "situation_match"}
    assert first["emotion_match"] == {"value": 0.75, "ci_low": ci.low, "ci_high": ci.high}
    assert first["problem_match"]["value"] == 0.5
    assert first["situation_match"]["value"] == pytest.approx(2 / 3)
    assert accuracy["iter2: m1 on 4 training contexts"]["emotion_match"]["value"] == 1.0


def test_no_reflection_results_no_section(tmp_path):
    table = make_table(2, 1)
    result = evaluate(table, EvaluationSettings(metrics=["length"], bootstrap_samples=20, n_examples=0))
    empty = evaluate(reflection_table("m0", [(None, None, None)] * 2), EvaluationSettings(metrics=["length"]))
    for reflections in ({}, {"iter1: m0 on 2 training contexts": empty}):  # the second has no reflection scores
        paths = write_report(result, table, tmp_path, reflections=reflections)
        assert "Reflection accuracy" not in paths["markdown"].read_text()
        assert "reflection_accuracy" not in json.loads(paths["metrics"].read_text())
