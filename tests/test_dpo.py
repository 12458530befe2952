"""DPO of M_t on its pairs: the reference is M_t, training moves rewards, a killed run resumes."""

import json
from pathlib import Path

import pytest
import torch

from esc_evolve.config import ExperimentConfig, validate_config
from esc_evolve.models import load_model
from esc_evolve.models.lineage import adapter_chain, write_lineage
from esc_evolve.pipeline import RunDir
from esc_evolve.pipeline.stages import dpo as dpo_stage
from esc_evolve.training.dpo import NoPairsError, build_dpo_trainer, train_dpo, trl_loss
from esc_evolve.training.settings import resolve_runtime
from tests.sft_fixtures import Interrupted, StopAt

PAIRS = [  # written for the tests
    ("My exam went badly.", "One bad exam hurts, but it does not define you. What subject was it?", "ok ok ok ok"),
    ("I argued with my sister.", "Arguments with family sting. What was it about?", "sorry sorry sorry"),
    ("I can't sleep before work.", "Lying awake before a workday is draining. What keeps your mind busy?", "no no"),
    ("My friend ignores me.", "Being ignored by a friend is lonely. How long has it been?", "fine fine fine"),
]


def _config(tmp_path: Path, model_dir: Path, **dpo) -> ExperimentConfig:
    raw = {
        "run": {"output_dir": str(tmp_path / "runs"), "name": "dpo", "seed": 5},
        "model": {"name": str(model_dir), "device": "cpu"},
        "dpo": {
            "max_steps": 6,
            "save_steps": 2,
            "logging_steps": 1,
            "learning_rate": 5e-3,
            "beta": 0.1,
            "per_device_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "max_length": 128,
            "lora": {"r": 8, "alpha": 16},
            "bf16": False,
            **dpo,
        },
    }
    return validate_config(raw, source="<test>")


def _m0(run_path: Path, model_dir: Path) -> Path:
    """A random (non-zero) LoRA adapter as M0, so that M0 differs from the backbone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    folder = run_path / "m0"
    model.save_pretrained(folder)
    write_lineage(folder, str(model_dir), None)
    return folder


def _write_pairs(run_path: Path, iteration: int = 1) -> None:
    folder = run_path / f"iter{iteration}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": c}],
            "chosen": [{"role": "assistant", "content": y2}],
            "rejected": [{"role": "assistant", "content": y}],
        }
        for c, y2, y in PAIRS
    ]
    (folder / "preference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_loss_options_map_to_trl() -> None:
    from esc_evolve.config import DPOSettings

    assert trl_loss(DPOSettings()) == (["sigmoid"], None)
    assert trl_loss(DPOSettings(loss_type="ipo", rpo_alpha=0.5)) == (["ipo", "sft"], [1.0, 0.5])


def test_reference_log_probs_are_m_t(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _config(tmp_path, tiny_model_dir)
    run = RunDir.create(config)
    m0 = _m0(run.path, tiny_model_dir)
    _write_pairs(run.path)
    rows = [json.loads(line) for line in (run.path / "iter1/preference.jsonl").open()]
    runtime = resolve_runtime(config.model, config.dpo)
    trainer = build_dpo_trainer(config.dpo, config.model, rows, runtime, m0, config.run.seed, tmp_path / "work", [])
    batch = next(iter(trainer.get_train_dataloader()))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)

    def completion_logps(model) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        return (logps * batch["completion_mask"][:, 1:]).sum(-1)

    m0_model, _ = load_model(config.model, adapter=m0)
    expected = completion_logps(m0_model)
    assert torch.allclose(torch.cat([ref_chosen, ref_rejected]), expected, atol=1e-3)
    base_model, _ = load_model(config.model)
    assert not torch.allclose(completion_logps(base_model), expected, atol=1e-2)  # the backbone is not M0


def test_dpo_trains_m1_on_top_of_m0_and_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _config(tmp_path, tiny_model_dir)
    run = RunDir.create(config)
    m0 = _m0(run.path, tiny_model_dir)
    _write_pairs(run.path)
    with pytest.raises(Interrupted):
        _train(config, run.path, m0, callbacks=[StopAt(3)])  # killed after the step-2 checkpoint
    assert not (run.path / "iter1/m1").exists()
    summary = _train(config, run.path, m0)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 6 and summary["pairs"] == 4
    assert summary["rewards_margins_last"] > summary["rewards_margins_first"]  # chosen pulled above rejected
    assert "rewards_accuracies_mean" in summary and "logps_chosen_last" in summary
    base, chain = adapter_chain(run.path / "iter1/m1")
    assert base == str(tiny_model_dir) and chain == [m0.resolve(), (run.path / "iter1/m1").resolve()]
    assert json.loads((run.path / "iter1/m1/train_summary.json").read_text())["steps"] == 6
    m1, _ = load_model(config.model, adapter=run.path / "iter1/m1")
    assert m1 is not None


def test_no_pairs_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _config(tmp_path, tiny_model_dir)
    run = RunDir.create(config)
    (run.path / "iter1").mkdir()
    (run.path / "iter1/preference.jsonl").write_text("")
    with pytest.raises(NoPairsError, match="no preference pair was kept"):
        _train(config, run.path, _m0(run.path, tiny_model_dir))


def test_pipeline_stage_logs_dpo_under_its_own_tensorboard_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    """DPO's TensorBoard events go to logs/tensorboard/dpo1, not into SFT's folder."""
    from tests.test_sft import _tensorboard_tags

    config = _config(tmp_path, tiny_model_dir, max_steps=2)
    run = RunDir.create(config)
    _m0(run.path, tiny_model_dir)
    _write_pairs(run.path)
    summary = dpo_stage(run, 1)
    assert summary["iteration"] == 1 and summary["steps"] == 2
    boards = run.path / "logs" / "tensorboard"
    assert "train/rewards/margins" in _tensorboard_tags(boards / "dpo1")
    assert not (boards / "sft").exists()


def _train(config: ExperimentConfig, run_path: Path, m0: Path, callbacks=None) -> dict:
    """DPO as a notebook would call it: no run directory, every path given."""
    folder = run_path / "iter1"
    return train_dpo(
        config.dpo,
        config.model,
        m0,
        folder / "preference.jsonl",
        folder / "m1",
        seed=config.run.seed,
        work_dir=folder / "dpo-checkpoints",
        callbacks=callbacks,
    )
