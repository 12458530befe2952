"""`esc-evolve eval-responses` and `esc-evolve human-eval` through typer (metrics that need no embedding model)."""

from __future__ import annotations

import csv
import json

import typer
from typer.testing import CliRunner

from esc_evolve.cli.eval_cmd import register
from esc_evolve.evaluation.responses import write_responses
from tests.eval_fixtures import make_rows, make_samples


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_eval_responses_command(tmp_path):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, make_rows(make_samples(4, 2)))
    out = tmp_path / "eval"
    args = [
        "eval-responses",
        str(responses),
        "--out",
        str(out),
        "--set",
        "eval.bootstrap_samples=50",
        "--set",
        "eval.headline=[m2, m0]",
        "--set",
        "eval.metrics=[bleu, rouge_l, distinct, length]",
    ]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    data = json.loads((out / "metrics.json").read_text())
    assert data["headline"] == ["m2", "m0"] and data["provenance"]["n_contexts"] == 8


def test_eval_responses_user_error(tmp_path):
    result = CliRunner().invoke(_app(), ["eval-responses", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "nope.jsonl: no such responses file" in " ".join(result.output.split())


def test_human_eval_commands(tmp_path):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, make_rows(make_samples(4, 1)))
    kit = tmp_path / "kit"
    runner = CliRunner()
    result = runner.invoke(_app(), ["human-eval", "export", str(responses), "--out", str(kit), "--pair", "m2:m0"])
    assert result.exit_code == 0, result.output
    with (kit / "sheet.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row.update(rater="ann", empathy="1", personalisation="2", helpfulness="tie", overall="1")
    filled = tmp_path / "ann.csv"
    with filled.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = runner.invoke(_app(), ["human-eval", "import", str(kit / "key.json"), str(filled), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "m2 vs m0" in (tmp_path / "human_eval.md").read_text()
    helpful = next(
        r for r in json.loads((tmp_path / "human_eval.json").read_text())["results"] if r["criterion"] == "helpfulness"
    )
    assert helpful["ties"] == 4 and helpful["win_rate"] == 0.5


def test_bad_settings_are_user_errors(tmp_path):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, make_rows(make_samples(2, 1)))
    for extra in (["--set", "eval.metrics=[nope]"], ["--set", "eval.bootstrap_unit=sentence"]):
        result = CliRunner().invoke(_app(), ["eval-responses", str(responses), "--out", str(tmp_path / "o"), *extra])
        assert result.exit_code == 2, result.output
