"""`esc-evolve simulate` end to end on the tiny model (supporters and local simulator), a stub OpenAI-compatible
server as the simulator (`--set simulate.backend=openai`), and the run's optional `eval.simulate` stage."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from esc_evolve.cli.app import app
from esc_evolve.config import load_config
from esc_evolve.pipeline.stages import stages
from esc_evolve.simulation import runner
from esc_evolve.simulation.rollout import TranscriptStore
from esc_evolve.simulation.scores import SCORE_NAMES
from tests.generation_fixtures import loopback_server
from tests.test_simulation_rollout import fake_tools

FAST = [
    "--set",
    "model.device=cpu",
    "--set",
    "generation.max_new_tokens=6",
    "--set",
    "simulate.max_new_tokens=6",
    "--set",
    "simulate.rating_max_new_tokens=6",
    "--set",
    "eval.bootstrap_samples=20",
]


def _app() -> typer.Typer:
    return app


@pytest.fixture(autouse=True)
def _no_embedding_model(monkeypatch):
    """The keyword classifier and hash embedder instead of MiniLM and the trained classifier."""
    monkeypatch.setattr(runner, "load_scoring_tools", lambda settings: fake_tools())


def test_simulate_command_on_the_tiny_model(tmp_path, tiny_model_dir, varied_model_dir):
    out = tmp_path / "sim"
    args = ["simulate", "--model", str(tiny_model_dir), "--model", str(varied_model_dir), "--turns", "2"]
    args += ["--max-cards", "3", "--out", str(out), "--set", f"simulate.model={tiny_model_dir}", *FAST]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    dialogues = TranscriptStore(out / "transcripts.jsonl").read()
    first, last = tiny_model_dir.name, varied_model_dir.name
    assert sorted({d.model for d in dialogues}) == sorted([first, last]) and len(dialogues) == 6
    assert all(d.finished and len(d.supporter_turns()) == 2 and d.rating is not None for d in dialogues)
    assert all(d.simulator.startswith(f"local model {tiny_model_dir}") for d in dialogues)
    scores = json.loads((out / "scores.json").read_text())
    assert scores["models"] == [first, last] and len(scores["cards"]) == 3
    assert set(scores["scores"][first]) == set(SCORE_NAMES) and set(scores["differences_vs_first"]) == {last}
    assert sum(scores["rating_status"][first].values()) == 3  # every end answer kept: ok, failed or error
    assert len(scores["per_dialogue"]) == 6
    markdown = (out / "scores.md").read_text()
    assert "| preference_alignment ↑ |" in markdown and f"Paired differences vs {first}" in markdown
    assert f"Transcripts side by side: {first} vs {last}" in markdown
    assert "Transcripts side by side" in (out / "report.html").read_text()
    assert (out / "plots" / "preference_alignment.png").is_file()

    again = CliRunner().invoke(_app(), args)  # resumed: every dialogue is reused, the scores are the same
    assert again.exit_code == 0, again.output
    assert [d.model_dump() for d in TranscriptStore(out / "transcripts.jsonl").read()] == [
        d.model_dump() for d in dialogues
    ]
    assert json.loads((out / "scores.json").read_text())["scores"] == scores["scores"]


def _seeker(body: dict) -> str:
    last = body["messages"][-1]["content"]
    return "4 - you let me say it" if "how understood did you feel" in last else "it has been a grey week"


@pytest.mark.parametrize("farm", [False, True], ids=["one-url", "url-list"])
def test_simulator_on_an_openai_compatible_server(tmp_path, tiny_model_dir, farm):
    out = tmp_path / "sim"
    with loopback_server(chat_answer=_seeker) as server:
        url = f"[{server.base_url}]" if farm else server.base_url  # base_url may also be a list of servers
        args = ["simulate", "--model", str(tiny_model_dir), "--turns", "2", "--max-cards", "2", "--out", str(out)]
        args += ["--set", "simulate.backend=openai", "--set", f"simulate.openai.base_url={url}"]
        args += ["--set", "simulate.openai.model=seeker-x", *FAST]
        result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    bodies = [s["body"] for s in server.seen]
    # Packaged cards have openings: per card one seeker turn and one rating, in one batch each.
    assert len(bodies) == 4 and {b["model"] for b in bodies} == {"seeker-x"}
    assert all("seed" in b for b in bodies)
    dialogues = TranscriptStore(out / "transcripts.jsonl").read()
    assert all(d.turns[2].text == "it has been a grey week" for d in dialogues)
    assert all(d.rating.value == 4.0 for d in dialogues)
    assert all(d.simulator == f"seeker-x at {server.base_url} (OpenAI-compatible)" for d in dialogues)
    assert json.loads((out / "scores.json").read_text())["scores"][tiny_model_dir.name]["felt_understood"][
        "value"
    ] == pytest.approx(4.0)


def test_unknown_simulator_backend_is_a_user_error(tmp_path, tiny_model_dir):
    args = ["simulate", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--set", "simulate.backend=remote"]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 2
    assert "unknown simulator backend 'remote'" in " ".join(result.output.split())


def test_the_run_gets_an_eval_simulate_stage_only_when_asked():
    assert "eval.simulate" not in [name for name, _ in stages(load_config(None))]
    names = [name for name, _ in stages(load_config(None, ["simulate.in_run=true"]))]
    assert names[-2:] == ["eval", "eval.simulate"]


def test_eval_simulate_stage_on_a_run(tmp_path, tiny_model_dir):
    from types import SimpleNamespace

    from esc_evolve.errors import ConfigError
    from esc_evolve.pipeline.evaluation import simulate_stage
    from esc_evolve.pipeline.layout import RunLayout
    from tests.generation_fixtures import make_adapter

    layout = RunLayout(tmp_path / "run")
    make_adapter(tiny_model_dir, layout.model_dir(0))
    overrides = [f"model.name={tiny_model_dir}", "simulate.turns=1", "simulate.max_cards=2", "simulate.in_run=true"]
    overrides += [o for o in FAST if o != "--set"] + ["simulate.models=[base, m0]"]
    config = load_config(None, overrides)
    summary = simulate_stage(SimpleNamespace(config=config, layout=layout))
    assert summary["models"] == ["base", "m0"] and summary["cards"] == 2
    dialogues = TranscriptStore(layout.eval_dir / "simulate" / "transcripts.jsonl").read()
    assert {(d.model, d.supporter) for d in dialogues} == {(m, f"{m} of {layout.root}") for m in ("base", "m0")}
    with pytest.raises(ConfigError, match="m3 not in"):
        simulate_stage(SimpleNamespace(config=load_config(None, [*overrides, "simulate.models=[m3]"]), layout=layout))
