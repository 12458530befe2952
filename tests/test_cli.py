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


def test_run_prepares_and_resumes(reference_run: Path, varied_model_dir: Path) -> None:
    """The whole pipeline on a tiny random model (`reference_run`: `esc-evolve run` in a subprocess, reflections
    and refinements scripted so that pairs are kept, see tests/pipeline_fixtures.py): every stage runs and records
    itself, DPO trains on the kept pairs; a rerun needs --resume and then redoes nothing."""
    from esc_evolve.models.lineage import adapter_chain
    from tests.pipeline_fixtures import (
        assert_same_results,
        register_scripted_backend,
        results_of,
        set_args,
        tiny_run_overrides,
    )

    run_dir = reference_run
    stages = json.loads((run_dir / "stages.json").read_text())
    assert list(stages) == ["prepare", "sft", "iter1.pairs", "iter1.dpo", "eval"]
    assert stages["prepare"]["train"]["conversations"] == 26 and stages["sft"]["steps"] == 4
    pairs = [json.loads(line) for line in (run_dir / "iter1/pairs.jsonl").read_text().splitlines()]
    kept = sum(p["keep"] for p in pairs)
    assert len(pairs) == stages["iter1.pairs"]["contexts"] == 4 and kept == stages["iter1.pairs"]["kept"] > 0
    assert stages["iter1.dpo"]["pairs"] == kept and stages["iter1.dpo"]["steps"] == 2  # DPO trained, no copy
    assert stages["iter1.dpo"]["rewards_margins_last"] > stages["iter1.dpo"]["rewards_margins_first"]
    assert adapter_chain(run_dir / "iter1/m1")[1] == [(run_dir / "m0").resolve(), (run_dir / "iter1/m1").resolve()]
    assert (run_dir / "report.html").is_file() and stages["eval"]["models"] == ["base", "m0", "m1", "human"]
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["seed"] == 42 and meta["versions"]["transformers"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "logs/run.log").is_file()
    for board in ("sft", "dpo1"):
        assert list((run_dir / "logs" / "tensorboard" / board).glob("events.*"))

    register_scripted_backend()
    before = results_of(run_dir)
    args = ["run", str(CONFIGS / "quickstart.yaml"), *set_args(tiny_run_overrides(run_dir.parent, varied_model_dir, 1))]
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run_dir / "stages.json").read_text()) == stages  # nothing redone
    assert_same_results(results_of(run_dir), before)  # and nothing rewritten
