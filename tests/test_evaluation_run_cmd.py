"""`esc-evolve eval RUN` and the eval stage with a judge, on a tiny run directory (tiny random model, m0 only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esc_evolve.cli.app import app
from esc_evolve.config import ExperimentConfig, dump_config
from esc_evolve.pipeline import RunDir, RunLayout
from esc_evolve.pipeline.evaluation import eval_stage, load_run_config

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A run directory as `esc-evolve run` leaves it after SFT: config.yaml and m0 (a random LoRA adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path_factory.mktemp("runs") / "tiny"
    config = ExperimentConfig()
    config.run.output_dir, config.run.name = str(run.parent), run.name
    config.model.name, config.model.device = str(tiny_model_dir), "cpu"
    config.data.context_window = 3
    config.generation.max_new_tokens = 8
    config.eval.max_contexts = 3
    config.eval.bootstrap_samples = 20
    config.eval.metrics = ["bleu", "distinct", "length"]
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(config))
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(run / "m0")
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def test_eval_run_writes_the_report_into_the_run_and_reuses_responses(tiny_run: Path, tmp_path: Path):
    run = _copy(tiny_run, tmp_path)
    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code == 0, result.output
    data = json.loads((run / "metrics.json").read_text())
    assert data["provenance"]["models"] == ["base", "m0", "human"] and data["provenance"]["n_contexts"] == 3
    assert data["headline"] == ["m0", "base"]
    report = (run / "report.md").read_text()
    assert "| metric | better | base | m0 | human |" in report and (run / "report.html").is_file()
    responses = run / "eval" / "responses.jsonl"
    written = responses.stat().st_mtime_ns
    again = runner.invoke(app, ["eval", str(run), "--model", "m0", "--model", "base"])  # nothing to generate
    assert again.exit_code == 0, again.output
    assert responses.stat().st_mtime_ns == written
    assert json.loads((run / "metrics.json").read_text())["provenance"]["models"] == ["m0", "base"]

    # A new output folder starts from the run's responses: a reply marked here (no model writes it) is reused.
    rows = [json.loads(line) for line in responses.read_text().splitlines()]
    rows[0]["response"] = "A reply marked by the test."
    responses.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elsewhere = tmp_path / "rescored"
    moved = runner.invoke(app, ["eval", str(run), "--out", str(elsewhere)])
    assert moved.exit_code == 0, moved.output
    assert "A reply marked by the test." in (elsewhere / "eval" / "responses.jsonl").read_text()
    assert (elsewhere / "report.md").is_file()


def test_eval_run_options_choose_models_split_contexts_and_output(tiny_run: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = ["eval", str(tiny_run), "--model", "m0", "--model", "human", "--split", "builtin:train"]
    args += ["--max-contexts", "2", "--out", str(out), "--set", "eval.metrics=[length]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "metrics.json").read_text())
    assert data["provenance"]["models"] == ["m0", "human"] and data["provenance"]["n_contexts"] == 2
    assert data["provenance"]["split"] == "builtin:train" and list(data["metrics"]) == ["length"]
    assert (out / "eval" / "responses.jsonl").is_file() and not (tiny_run / "report.md").exists()


def test_eval_run_user_errors(tiny_run: Path, tmp_path: Path):
    cases = [
        (["eval", str(tmp_path)], "not a run directory"),
        (["eval", str(tmp_path / "nope")], "does not exist"),
        (["eval", str(tiny_run), "--model", "m2"], "m2 not in"),
        (["eval", str(tiny_run), "--model", "human"], "no generated model to evaluate"),
        (["eval", str(tiny_run), "--set", "model.name=other"], "only eval.KEY=VALUE"),
        (["eval", str(tiny_run), "--set", "eval.judge.backend=remote", "--set", "eval.metrics=[judge]"], "remote"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)


def test_eval_stage_with_local_judge_counts_unparseable_answers(tiny_run: Path, tmp_path: Path):
    """The pipeline's eval stage with `eval.judge.backend: local` judges with the run's (tiny, random) backbone: its
    answers are noise or do not fit its context, and the report counts them instead of failing or hiding them."""
    run = _copy(tiny_run, tmp_path)
    config = load_run_config(run)
    config.eval.metrics = ["length", "judge"]
    config.eval.judge.backend = "local"
    config.eval.judge.max_new_tokens = 6
    config.eval.judge.max_contexts = 2
    summary = eval_stage(RunDir(RunLayout(run), config))
    assert any("unparseable answer" in note for note in summary["notes"])
    judge = json.loads((run / "metrics.json").read_text())["details"]["judge"]
    assert judge["backend"].startswith(f"local model {config.model.name}")
    assert sum(judge["status_counts"].values()) == judge["calls"] == 3 * 2 + 2 * 2  # 3 models, pair m0 vs base
    unusable = sum(c for k, c in judge["status_counts"].items() if k.endswith((":failed", ":error")))
    assert unusable >= 1 and f"**{unusable} without a usable answer**" in (run / "report.md").read_text()
    assert len((run / "eval" / "judge_records.jsonl").read_text().splitlines()) == judge["calls"]


def test_the_report_shows_how_well_each_iterations_reflections_match_the_gold_profile(tiny_run: Path, tmp_path: Path):
    """Reflections written by the evolve loop (iterN/pairs.jsonl) reach evaluation: emotion, problem and
    situation inferred by M_{N-1} are matched against the seekers' gold profiles, per iteration."""
    from esc_evolve.data import load_train
    from esc_evolve.evolve.pairs import PairRecord, PairStore

    run = _copy(tiny_run, tmp_path)
    config = load_run_config(run)
    samples = [s for s in load_train(config.data).samples if s.profile.emotion_type][:4]
    guesses = [s.profile.emotion_type for s in samples[:3]] + ["jealousy"]  # three right, one wrong
    assert samples[3].profile.emotion_type != "jealousy"
    records = [
        PairRecord(
            sample_id=s.sample_id,
            iteration=1,
            principles_version=4,
            prompt=[{"role": "user", "content": "hi"}],
            rejected="A draft.",
            rejected_finish="stop",
            reflection={
                "parsed": True,
                "fields": {
                    "emotion": {"name": "emotion", "raw": guess, "value": guess, "status": "ok"},
                    "situation": {"name": "situation", "raw": "x", "value": s.profile.situation, "status": "ok"},
                },
            },
            refine_system="",
            chosen="A reply.",
            chosen_finish="stop",
            keep=True,
            reasons=[],
            rejected_degenerate=None,
            gold={},
        )
        for s, guess in zip(samples, guesses, strict=True)
    ]
    PairStore(RunLayout(run).pairs_file(1)).append(records)
    config.eval.metrics = [*config.eval.metrics, "reflection"]  # the table is part of the reflection metric
    summary = eval_stage(RunDir(RunLayout(run), config))
    assert summary["contexts"] == 3
    accuracy = json.loads((run / "metrics.json").read_text())["reflection_accuracy"]
    (label,) = accuracy
    assert label.startswith("iter1: m0 on 4 training contexts")
    assert accuracy[label]["emotion_match"]["value"] == pytest.approx(0.75)
    assert accuracy[label]["reflection_coverage"]["value"] == 1.0
    assert "Reflection accuracy" in (run / "report.md").read_text()
