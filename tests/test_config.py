from pathlib import Path

import pytest

from esc_evolve.config import ExperimentConfig, dump_config, load_config, validate_config
from esc_evolve.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["quickstart.yaml", "esconv-cpu.yaml"])
def test_shipped_cpu_configs_validate(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert isinstance(config, ExperimentConfig)
    assert config.model.device == "cpu"


@pytest.mark.parametrize(
    ("name", "backbone"),
    [
        ("paper-llama3-8b.yaml", "meta-llama/Meta-Llama-3-8B-Instruct"),
        ("paper-qwen2-7b.yaml", "Qwen/Qwen2-7B-Instruct"),
        ("paper-mistral-7b.yaml", "mistralai/Mistral-7B-Instruct-v0.3"),
    ],
)
def test_paper_configs_validate_and_share_one_default(name: str, backbone: str) -> None:
    config = load_config(CONFIGS / name)
    assert config.model.name == backbone and config.model.device == "cuda"
    assert config.generation.backend == "vllm" and config.evolve.iterations == 2
    assert config.run.name == name.removesuffix(".yaml")
    base = load_config(CONFIGS / "paper-base.yaml")
    # everything but the run name and the backbone comes from paper-base.yaml
    assert (
        config.model_copy(update={"run": base.run, "model": base.model.model_copy(update={"name": base.model.name})})
        == base
    )


def test_extends_merges_sections(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("sft:\n  learning_rate: 0.001\n  epochs: 3\nrun:\n  seed: 7\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nsft:\n  epochs: 1\n")
    config = load_config(tmp_path / "child.yaml")
    assert config.sft.learning_rate == 0.001  # kept from the parent
    assert config.sft.epochs == 1  # overridden by the child
    assert config.run.seed == 7


def test_misspelled_key_is_named_with_file_and_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("sft:\n  learnig_rate: 0.001\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "sft.learnig_rate" in message
    assert str(path) in message
    assert "did you mean 'learning_rate'" in message


def test_unknown_section_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'trainer'"):
        load_config(path)


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("sft:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"sft\.epochs"):
        load_config(path)


def test_set_overrides_yaml_with_typed_values() -> None:
    config = load_config(
        CONFIGS / "quickstart.yaml",
        ["sft.learning_rate=1e-4", "sft.lora.target_modules=[q_proj, v_proj]", "data.valid_path=null"],
    )
    assert config.sft.learning_rate == pytest.approx(1e-4)
    assert config.sft.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.valid_path is None


def test_set_with_unknown_key_or_bad_syntax_fails() -> None:
    with pytest.raises(ConfigError, match="sft.learnig_rate"):
        load_config(None, ["sft.learnig_rate=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["sft.learning_rate"])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("sft: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_dump_round_trips() -> None:
    import yaml

    config = load_config(CONFIGS / "esconv-cpu.yaml")
    again = ExperimentConfig.model_validate(yaml.safe_load(dump_config(config)))
    assert again == config


def test_renamed_keys_still_work_and_say_what_to_rename(caplog: pytest.LogCaptureFixture) -> None:
    old = {
        "sft": {"max_seq_length": 300},
        "generation": {"static_cache": False, "openai_base_url": "http://127.0.0.1:9/v1", "max_concurrency": 3},
        "eval": {"judge_backend": "openai", "judge_model": "judge-x", "judge_max_contexts": 5},
        "data": {"format": "auto"},
    }
    with caplog.at_level("WARNING"):
        config = validate_config(old, "old.yaml")
    new = {
        "sft": {"max_length": 300},
        "generation": {
            "transformers": {"static_cache": False},
            "openai": {"base_url": "http://127.0.0.1:9/v1", "max_concurrency": 3},
        },
        "eval": {"judge": {"backend": "openai", "openai": {"model": "judge-x"}, "max_contexts": 5}},
    }
    assert config == validate_config(new, "new.yaml")
    assert "'sft.max_seq_length' is now 'sft.max_length'" in caplog.text
    assert "'eval.judge_model' is now 'eval.judge.openai.model'" in caplog.text
    assert "'data.format' is no longer a setting" in caplog.text
    local = validate_config({"eval": {"judge_backend": "local", "judge_model": "some/model"}}, "old.yaml")
    assert local.eval.judge.model == "some/model" and local.eval.judge.openai is None


def test_a_key_under_its_old_and_new_name_is_an_error() -> None:
    with pytest.raises(ConfigError, match="'sft.max_seq_length' and 'sft.max_length' are the same setting"):
        validate_config({"sft": {"max_seq_length": 300, "max_length": 200}}, "x.yaml")


def test_sft_and_dpo_share_the_trainer_fields() -> None:
    from esc_evolve.config import DPOSettings, SFTSettings, TrainerSettings

    shared = set(TrainerSettings.model_fields)
    assert shared <= set(SFTSettings.model_fields) and shared <= set(DPOSettings.model_fields)
    assert {"max_length", "num_threads", "lr_scheduler", "warmup_ratio"} <= shared
    assert DPOSettings().learning_rate == 5e-5 and SFTSettings().learning_rate == 2e-4


def test_a_judge_endpoint_keeps_what_it_inherits_through_a_saved_config() -> None:
    """eval.judge.openai overrides generation.openai field by field; the saved config.yaml must not turn the
    inherited fields into explicit defaults."""
    import yaml

    from esc_evolve.evaluation.judge.backends import judge_endpoint

    raw = {
        "generation": {"openai": {"api_key_env": "MY_KEY", "base_url": "http://127.0.0.1:9/v1"}},
        "eval": {"judge": {"backend": "openai", "openai": {"model": "judge-x"}}},
    }
    config = validate_config(raw, "<test>")
    reloaded = validate_config(yaml.safe_load(dump_config(config)), "config.yaml")
    for loaded in (config, reloaded):
        endpoint = judge_endpoint(loaded.eval.judge, loaded.generation)
        assert (endpoint.model, endpoint.api_key_env, endpoint.base_url) == (
            "judge-x",
            "MY_KEY",
            "http://127.0.0.1:9/v1",
        )


def test_a_bare_off_in_yaml_means_the_off_choice() -> None:
    # YAML 1.1 reads `off` as False; a setting whose choices include 'off' takes it as meant, in files and --set.
    config = load_config(None, ["evolve.situation_grounding=off", "evolve.filters.role_check=off"])
    assert (config.evolve.situation_grounding, config.evolve.filters.role_check) == ("off", "off")
    with pytest.raises(ConfigError, match="situation_grounding"):
        load_config(None, ["evolve.situation_grounding=true"])
