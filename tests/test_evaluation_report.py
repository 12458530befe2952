"""Report rendering: files exist and contain the summary table, the headline, the plots and the examples."""

from __future__ import annotations

import json

from esc_evolve.evaluation.evaluate import evaluate
from esc_evolve.evaluation.report import write_report
from esc_evolve.evaluation.settings import EvaluationSettings
from tests.eval_fixtures import HashEmbedder, fake_judge, make_table, tiny_classifier


def test_report_files(tmp_path):
    table = make_table(6, 2)
    embedder = HashEmbedder()
    settings = EvaluationSettings(bootstrap_samples=100, n_examples=2, judge_pairs=[("m2", "m0")])
    result = evaluate(table, settings, embedder=embedder, classifier=tiny_classifier(embedder), judge=fake_judge)
    paths = write_report(result, table, tmp_path, {"responses_file": "r.jsonl"})

    md = paths["markdown"].read_text()
    assert "## Headline: m2 vs m0" in md
    assert "| metric | better | base | m0 | m1 | m2 | human |" in md
    for metric in ("bleu_2", "rouge_l", "distinct_2", "preference_bias", "preference_discrepancy", "unhelpful_judge"):
        assert f"| {metric}" in md
    assert "![Metrics per model](plots/metrics.png)" in md
    assert "## Example responses" in md and "human (reference)" in md

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


def test_report_html_escapes_model_output(tmp_path):
    table = make_table(2, 1)
    table.responses["m1"][0] = "<script>alert(1)</script>"
    result = evaluate(table, EvaluationSettings(metrics=["length"], bootstrap_samples=20, n_examples=2))
    page = write_report(result, table, tmp_path)["html"].read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
