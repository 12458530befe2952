"""RunLayout: the one place that names a run's paths; RunDir: resuming a run made with old config keys."""

from pathlib import Path

import pytest
import yaml

from esc_evolve.config import ExperimentConfig, RunSettings, dump_config
from esc_evolve.errors import ConfigError
from esc_evolve.pipeline import RunDir, RunLayout


def test_paths_follow_the_method(tmp_path: Path) -> None:
    layout = RunLayout.of(RunSettings(output_dir=str(tmp_path), name="r"))
    root = tmp_path / "r"
    assert layout.root == root
    assert layout.model_dir(0) == root / "m0" and layout.model_dir(2) == root / "iter2" / "m2"
    assert layout.pairs_file(1) == root / "iter1" / "pairs.jsonl"
    assert layout.preference_file(1) == root / "iter1" / "preference.jsonl"
    assert layout.dpo_work_dir(3) == root / "iter3" / "dpo-checkpoints"
    assert layout.tensorboard_dir("dpo2") == root / "logs" / "tensorboard" / "dpo2"
    assert layout.responses_file == root / "eval" / "responses.jsonl"


def test_models_by_name(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    assert layout.adapter_of("base") is None and layout.adapter_of("m1") == tmp_path / "iter1" / "m1"
    with pytest.raises(ValueError, match="not a model of a run"):
        layout.adapter_of("human")
    for folder in (layout.model_dir(0), layout.model_dir(1)):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
    layout.iteration_dir(2).mkdir()  # an iteration whose DPO has not finished: no m2 yet
    assert layout.iterations() == [1, 2]
    assert layout.model_names() == ["base", "m0", "m1"]


def test_a_run_written_with_old_key_names_resumes(tmp_path: Path) -> None:
    config = ExperimentConfig.model_validate({"run": {"output_dir": str(tmp_path), "name": "old"}})
    run = RunDir.create(config)
    saved = yaml.safe_load(run.layout.config_file.read_text())
    saved["sft"]["max_seq_length"] = saved["sft"].pop("max_length")  # as an older esc-evolve wrote it
    run.layout.config_file.write_text(yaml.safe_dump(saved))
    assert RunDir.create(config, resume=True).layout == run.layout
    changed = config.model_copy(update={"sft": config.sft.model_copy(update={"max_length": 100})})
    with pytest.raises(ConfigError, match="differs"):
        RunDir.create(changed, resume=True)
    assert dump_config(config) != run.layout.config_file.read_text()  # the file itself is left as it was
