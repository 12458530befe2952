"""Helpers for tests/test_sft.py: small conversations written for the tests and configs on the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from esc_evolve.config import ExperimentConfig, validate_config
from tests.conftest import make_record, write_jsonl

# Supporter replies written for these tests (not corpus text); each conversation gets a different pair.
REPLIES = [
    ("That sounds really hard.", "What worries you most about it?"),
    ("I can hear how tired you are.", "Have you been able to rest at all?"),
    ("It makes sense to feel lost.", "Who could you talk to this week?"),
    ("You have handled a lot.", "What helped you last time?"),
]


def write_conversations(path: Path, count: int = 8) -> Path:
    records = []
    for index in range(count):
        first, second = REPLIES[index % len(REPLIES)]
        record = make_record()
        dialog = [dict(turn) for turn in record["dialog"]]
        dialog[3]["text"], dialog[4]["text"] = first, second
        records.append({**record, "dialog": dialog})
    return write_jsonl(path, records)


def tiny_config(tmp_path: Path, model_dir: Path, **sft: Any) -> ExperimentConfig:
    """A config on the tiny model; train and valid are the same small file, so eval loss must follow training."""
    data = write_conversations(tmp_path / "conversations.jsonl")
    raw = {
        "run": {"output_dir": str(tmp_path / "runs"), "name": "tiny", "seed": 3},
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {"train_path": str(data), "valid_path": str(data), "context_window": 4},
        "sft": {
            "max_steps": 8,
            "save_steps": 4,
            "logging_steps": 1,
            "learning_rate": 1e-2,
            "warmup_ratio": 0.0,
            "per_device_batch_size": 4,
            "max_length": 256,
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "bf16": False,  # the same numerics on every CPU (auto would follow the CPU's bf16 support)
            **sft,
        },
    }
    return validate_config(raw, source="<test>")


class Interrupted(Exception):
    pass


class StopAt(TrainerCallback):
    """Stands in for a kill: stops training at a step, after a checkpoint was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.step:
            raise Interrupted
