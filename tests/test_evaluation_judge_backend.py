"""Judge backends (`eval.judge.backend`): the registry, none, local (the tiny model), openai (against a stdlib
HTTP stub)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from esc_evolve.cli.eval_cmd import register
from esc_evolve.config import ExperimentConfig, GenerationSettings, JudgeSettings, OpenAISettings, load_config
from esc_evolve.errors import ConfigError
from esc_evolve.evaluation.evaluate import evaluate
from esc_evolve.evaluation.judge import CallableJudge, Judge, build_judge, judge_endpoint, register_judge
from esc_evolve.evaluation.judge import backends as judge_backends
from esc_evolve.evaluation.report import write_report
from esc_evolve.evaluation.responses import write_responses
from esc_evolve.evaluation.settings import EvaluationSettings
from tests.eval_fixtures import fake_judge, make_rows, make_samples, make_table
from tests.generation_fixtures import loopback_server

SECRET = "sk-test-do-not-store-4f2a9c"
MESSAGES = [{"role": "system", "content": "You rate."}, {"role": "user", "content": "Rate this."}]


def _judge_answer(body: dict[str, Any]) -> str:
    """Canned judge answers: a verdict for pairwise prompts; pointwise scores that depend on the response (the
    base model's "I'm so sorry" loop gets an unparseable answer, m0's stock reply helpfulness 2)."""
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    if "TWO candidate" in system:
        return '{"winner": "A"}'
    if "I'm so sorry to hear that. I'm so sorry" in user:
        return "I would rather not rate this one."
    helpful = 2 if "I understand." in user else 4
    return json.dumps({"empathy": 3, "personalisation": 3, "helpfulness": helpful, "fluency": 4, "safety": 5})


def judge_server() -> Any:
    """The OpenAI-compatible stub of tests/generation_fixtures.py, answering as a judge."""
    return loopback_server(chat_answer=_judge_answer)


def _config(**judge_fields: Any) -> ExperimentConfig:
    """The default config with `eval.judge` fields set (`openai` as a dict of the fields set explicitly)."""
    config = ExperimentConfig()
    if "openai" in judge_fields:
        judge_fields["openai"] = OpenAISettings(**judge_fields["openai"])
    config.eval.judge = JudgeSettings(**judge_fields)
    return config


def _build(config: ExperimentConfig) -> Judge | None:
    return build_judge(config.eval.judge, config.model, config.generation, seed=config.run.seed)


def _served(server: Any, **openai: Any) -> ExperimentConfig:
    return _config(backend="openai", openai={"base_url": server.base_url, "model": "judge-x", **openai})


# ---------------------------------------------------------------------------------------------------------
# The registry


def test_unknown_backend_is_a_config_error_listing_the_registered_ones():
    with pytest.raises(ConfigError, match=r"unknown judge backend 'remote'.*registered: local, none, openai"):
        _build(_config(backend="remote"))


def test_a_registered_backend_is_built_from_the_config(monkeypatch):
    monkeypatch.setattr(judge_backends.JUDGES, "entries", dict(judge_backends.JUDGES.entries))  # registrations end here
    seen = {}

    @register_judge("fixed")
    def fixed(settings, model, generation, seed):
        seen.update(model=model.name, tokens=settings.max_new_tokens, seed=seed)
        return CallableJudge(fake_judge, description=f"fixed judge for {model.name}")

    with pytest.raises(ValueError, match="registered twice"):
        register_judge("fixed")(fixed)
    config = load_config(None, ["eval.judge.backend=fixed", "eval.judge.max_new_tokens=7", "run.seed=3"])
    judge = _build(config)
    assert isinstance(judge, Judge) and judge.description == f"fixed judge for {config.model.name}"
    assert seen == {"model": config.model.name, "tokens": 7, "seed": 3}
    table = make_table(2, 1)
    settings = EvaluationSettings.for_experiment(config).model_copy(
        update={"metrics": ["judge"], "bootstrap_samples": 10}
    )
    result = evaluate(table, settings, judge=judge)
    assert result.info["judge"]["backend"].startswith("fixed judge") and result.estimates["m1"]["judge_empathy"]


def test_old_flat_judge_keys_still_configure_the_judge():
    config = load_config(None, ["eval.judge_backend=openai", "eval.judge_url=http://h:1/v1", "eval.judge_model=j"])
    assert (config.eval.judge.backend, config.eval.judge.openai.base_url, config.eval.judge.openai.model) == (
        "openai",
        "http://h:1/v1",
        "j",
    )
    local = load_config(None, ["eval.judge_backend=local", "eval.judge_model=some/model"])
    assert local.eval.judge.model == "some/model" and local.eval.judge.openai is None


def test_judge_endpoint_takes_only_the_fields_set_in_eval_judge_openai():
    generation = GenerationSettings()
    generation.openai = OpenAISettings(base_url="http://gen/v1", api_key_env="GEN_KEY", request_timeout=7.0)
    assert judge_endpoint(JudgeSettings(), generation) == generation.openai
    own = JudgeSettings(openai=OpenAISettings(model="judge-x", max_concurrency=2))
    endpoint = judge_endpoint(own, generation)
    assert (endpoint.base_url, endpoint.model, endpoint.api_key_env) == ("http://gen/v1", "judge-x", "GEN_KEY")
    assert (endpoint.request_timeout, endpoint.max_concurrency) == (7.0, 2)
    from_yaml = load_config(None, ["generation.openai.api_key_env=GEN_KEY", "eval.judge.openai.model=judge-x"])
    assert judge_endpoint(from_yaml.eval.judge, from_yaml.generation).api_key_env == "GEN_KEY"


# ---------------------------------------------------------------------------------------------------------
# Built-in backends


def test_none_builds_no_judge():
    assert _build(_config()) is None


def test_openai_judge_calls_the_server_greedily_with_the_key_from_the_env(monkeypatch):
    monkeypatch.setenv("ESC_TEST_JUDGE_KEY", SECRET)
    with judge_server() as server:
        config = _served(server, api_key_env="ESC_TEST_JUDGE_KEY")
        config.eval.judge.max_new_tokens = 50
        config.generation.temperature = 0.8  # the responses' sampling must not leak into the judge
        with _build(config) as judge:
            (answer,) = judge.ask([MESSAGES])
        assert json.loads(answer)["helpfulness"] == 4
        assert judge.description == f"judge-x at {server.base_url} (OpenAI-compatible, greedy)"
    (call,) = server.seen
    assert call["path"] == "/v1/chat/completions" and call["auth"] == f"Bearer {SECRET}"
    body = call["body"]
    assert (body["model"], body["temperature"], body["max_tokens"], body["messages"]) == ("judge-x", 0.0, 50, MESSAGES)


def test_openai_judge_batch_sends_prompts_concurrently_and_answers_in_order():
    prompts = [
        [*MESSAGES[:1], {"role": "user", "content": f"Rate this. Response {i}: I understand."}] for i in range(6)
    ]
    prompts[2] = [MESSAGES[0], {"role": "user", "content": "I'm so sorry to hear that. I'm so sorry"}]
    with judge_server() as server:
        server.delay = lambda _body: 0.05
        config = _served(server)
        config.generation.openai.max_concurrency = 3  # the judge's endpoint inherits it
        with _build(config) as judge:
            answers = judge.ask(prompts)
            assert judge.ask([]) == []
    assert answers[2] == "I would rather not rate this one."
    assert [json.loads(a)["helpfulness"] for i, a in enumerate(answers) if i != 2] == [2] * 5
    assert len(server.seen) == 6 and 1 < server.max_in_flight <= 3
    assert all(c["body"]["temperature"] == 0.0 and c["body"]["max_tokens"] == 256 for c in server.seen)


def test_judge_metric_batches_an_openai_judge(tmp_path: Path):
    """The judge metric sends all its prompts through one `generate` call, answered concurrently; the records
    are what one call per prompt gives."""
    table = make_table(3, 1)
    settings = EvaluationSettings(metrics=["judge"], bootstrap_samples=10, judge={"pairs": [("m1", "m0")]})
    with judge_server() as server:
        server.delay = lambda _body: 0.02
        with _build(_served(server)) as judge:
            generate, sizes = judge.generator.generate, []

            def counting_generate(requests, progress=True):
                sizes.append(len(requests))
                return generate(requests, progress=False)

            judge.generator.generate = counting_generate
            batched = evaluate(table, settings, judge=judge, out_dir=tmp_path / "batched")
            one_by_one = evaluate(table, settings, judge=lambda m: judge.ask([m])[0], out_dir=tmp_path / "plain")
    calls = batched.info["judge"]["calls"]
    assert calls == 3 * len(table.models) + 3 * 2 and sizes == [calls] + [1] * calls
    assert server.max_in_flight > 1 and len(server.seen) == 2 * calls
    assert {**batched.info["judge"], "backend": None} == {**one_by_one.info["judge"], "backend": None}
    assert batched.info["judge"]["status_by_model"]["base"] == {"failed": 3}
    records = [(tmp_path / d / "judge_records.jsonl").read_text() for d in ("batched", "plain")]
    assert records[0] == records[1]


def test_openai_judge_key_defaults_to_the_generation_variable(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with judge_server() as server:
        _build(_served(server)).ask([MESSAGES])
    assert server.seen[0]["auth"] == f"Bearer {SECRET}"
    monkeypatch.setenv("ESC_TEST_GEN_KEY", SECRET + "-gen")
    with judge_server() as server:
        config = _served(server)
        config.generation.openai.api_key_env = "ESC_TEST_GEN_KEY"
        _build(config).ask([MESSAGES])
    assert server.seen[0]["auth"] == f"Bearer {SECRET}-gen"


def test_openai_judge_needs_a_model_name():
    with pytest.raises(ConfigError, match="eval.judge.openai.model"):
        _build(_config(backend="openai", openai={"base_url": "http://127.0.0.1:9/v1"}))


def test_local_judge_is_the_backbone_or_judge_model_without_adapter(tiny_model_dir: Path):
    config = _config(backend="local", max_new_tokens=4)
    config.model.name = str(tiny_model_dir)
    with _build(config) as judge:
        assert isinstance(judge.ask([MESSAGES])[0], str)
        assert judge.generator.config.temperature == 0.0 and judge.generator.config.max_new_tokens == 4
        assert str(tiny_model_dir) in judge.description
    other = _config(backend="local", model=str(tiny_model_dir))  # model.name: the default backbone
    with _build(other) as judge:
        assert str(tiny_model_dir) in judge.description


def test_local_judge_too_small_for_the_prompt_is_counted_not_dropped(tiny_model_dir: Path, tmp_path: Path):
    """The tiny model's 512-token context cannot hold the pointwise prompt (the call raises) and its pairwise
    answers are noise (unparseable): every call is counted as such, and the report says so."""
    config = _config(backend="local", max_new_tokens=4)
    config.model.name = str(tiny_model_dir)
    table = make_table(2, 1)
    settings = EvaluationSettings(metrics=["length", "judge"], bootstrap_samples=10, judge={"max_contexts": 1})
    with _build(config) as judge:
        result = evaluate(table, settings, judge=judge, out_dir=tmp_path)
    info = result.info["judge"]
    assert all(counts == {"error": 1} for counts in info["status_by_model"].values())
    unusable = sum(c for k, c in info["status_counts"].items() if k.endswith((":error", ":failed")))
    assert unusable == info["calls"] == len(table.models) + 2 * len(info["status_by_pair"])  # 1 context, 2 orders
    assert any("unparseable answer" in note and "raised" in note for note in result.notes)
    write_report(result, table, tmp_path)
    assert f"**{info['calls']} without a usable answer**" in (tmp_path / "report.md").read_text()


def test_eval_responses_with_openai_judge_reports_failures_and_unhelpful_rate(monkeypatch, tmp_path: Path):
    """The CLI wires the judge; the key is used but written nowhere; failures and the unhelpful rate are shown."""
    monkeypatch.setenv("ESC_TEST_JUDGE_KEY", SECRET)
    responses, out = tmp_path / "responses.jsonl", tmp_path / "eval"
    write_responses(responses, make_rows(make_samples(3, 1)))
    app = typer.Typer()
    register(app)
    with judge_server() as server:
        sets = [
            "eval.metrics=[length, judge]",
            "eval.bootstrap_samples=20",
            "eval.judge.backend=openai",
            f"eval.judge.openai.base_url={server.base_url}",
            "eval.judge.openai.model=judge-x",
            "eval.judge.openai.api_key_env=ESC_TEST_JUDGE_KEY",
        ]
        args = ["eval-responses", str(responses), "--out", str(out), *(a for s in sets for a in ("--set", s))]
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert server.seen and all(c["auth"] == f"Bearer {SECRET}" for c in server.seen)
    data = json.loads((out / "metrics.json").read_text())
    judge = data["details"]["judge"]
    assert judge["status_by_model"]["base"] == {"failed": 3} and judge["status_by_model"]["m1"] == {"ok": 3}
    assert data["estimates"]["m0"]["unhelpful_judge"]["value"] == 1.0
    assert data["estimates"]["m1"]["unhelpful_judge"]["value"] == 0.0
    report = (out / "report.md").read_text()
    assert "## LLM judge" in report and "judge-x at" in report and "**3 without a usable answer**" in report
    assert "| m0 | 3 | 0 | 0 | 0 | 100.0" in report
    for path in out.rglob("*"):
        assert not path.is_file() or SECRET not in path.read_text(errors="replace"), path
