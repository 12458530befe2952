import json
from pathlib import Path

from typer.testing import CliRunner

from esc_evolve.cli.app import app
from tests.conftest import make_record, write_jsonl

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_data_stats_on_real_train_split(shared_data: Path) -> None:
    result = runner.invoke(app, ["data", "stats", str(shared_data / "esconv/train.jsonl")])
    assert result.exit_code == 0, result.output
    assert "│ conversations" in result.output and "910" in result.output
    assert "12759" in result.output  # strategy total = supporter utterances


def test_data_stats_on_failed_esconv(shared_data: Path) -> None:
    result = runner.invoke(app, ["data", "stats", str(shared_data / "esconv_failed/FailedESConv.json")])
    assert result.exit_code == 0, result.output
    assert "196" in result.output and "esconv_raw" in result.output


def test_bad_data_is_one_clear_message(tmp_path: Path) -> None:
    bad = make_record()
    bad["dialog"][1]["speaker"] = "robot"
    path = write_jsonl(tmp_path / "bad.jsonl", [bad])
    result = runner.invoke(app, ["data", "stats", str(path)])
    assert result.exit_code == 2
    assert "bad.jsonl:1" in result.output and "dialog[1].speaker" in result.output
    assert "Traceback" not in result.output


def test_skip_invalid_reports_count(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(make_record()) + "\nnot json\n")
    result = runner.invoke(app, ["data", "stats", str(path), "--skip-invalid"])
    assert result.exit_code == 0, result.output
    assert "skipped invalid records" in result.output


def test_config_show_resolves_and_rejects_typos(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "show", str(CONFIGS / "esconv-cpu.yaml"), "--set", "sft.epochs=3"])
    assert result.exit_code == 0, result.output
    assert "epochs: 3" in result.output and "name: esconv-cpu" in result.output
    bad = tmp_path / "typo.yaml"
    bad.write_text("model:\n  nmae: x\n")
    result = runner.invoke(app, ["config", "show", str(bad)])
    assert result.exit_code == 2 and "model.nmae" in result.output and "Traceback" not in result.output


def test_data_preview_renders_chat_template(tiny_model_dir: Path) -> None:
    result = runner.invoke(
        app, ["data", "preview", "builtin:valid", "--n", "2", "--set", f"model.name={tiny_model_dir}"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("target response") == 2
    assert "<|im_start|>assistant" in result.output


def test_run_prepares_and_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The whole pipeline on a tiny random model: every stage runs and records itself; a rerun redoes nothing."""
    overrides = [
        f"run.output_dir={tmp_path}",
        f"model.name={tiny_model_dir}",
        "sft.max_steps=2",
        "sft.max_eval_samples=4",
        "evolve.iterations=1",
        "evolve.contexts_per_iteration=4",
        "dpo.max_steps=2",
        "eval.max_contexts=6",
        "eval.bootstrap_samples=20",
        "generation.max_new_tokens=8",
        "data.context_window=3",  # reflection prompts quote the context: keep them inside the tiny model's 512
    ]
    args = ["run", str(CONFIGS / "quickstart.yaml")] + [arg for o in overrides for arg in ("--set", o)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "quickstart"
    stages = json.loads((run_dir / "stages.json").read_text())
    assert list(stages) == ["prepare", "sft", "iter1.pairs", "iter1.dpo", "eval"]
    assert stages["prepare"]["train"]["conversations"] > 0
    assert stages["iter1.pairs"]["contexts"] == 4 and len((run_dir / "iter1/pairs.jsonl").read_text().splitlines()) == 4
    assert (run_dir / "m0/adapter_config.json").is_file() and (run_dir / "iter1/m1/adapter_config.json").is_file()
    assert (run_dir / "report.html").is_file() and (run_dir / "eval/responses.jsonl").is_file()
    assert set(stages["eval"]["models"]) >= {"base", "m0", "m1", "human"}
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["seed"] == 42 and meta["versions"]["transformers"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "logs/run.log").is_file()
    boards = run_dir / "logs" / "tensorboard"
    assert list((boards / "sft").glob("events.*"))
    trained = stages["iter1.dpo"]["steps"] > 0  # a random tiny model may keep no pair: m1 is then m0
    assert bool(list((boards / "dpo1").glob("events.*"))) is trained

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run_dir / "stages.json").read_text())["prepare"] == stages["prepare"]  # not redone
