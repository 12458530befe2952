"""Shared fixtures: the read-only corpus in ../shared/data (skipped when absent) and a tiny local model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Tests never reach a model hub: everything they load is built locally or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ESC_EVOLVE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "esconv" / "train.jsonl").is_file():
        pytest.skip(f"ESConv files not found under {SHARED_DATA} (set ESC_EVOLVE_SHARED_DATA to run these tests)")
    return SHARED_DATA


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_record(**overrides) -> dict:
    """A small conversation in the ESConv split format (text written for the tests)."""
    record = {
        "experience_type": "Current Experience",
        "emotion_type": "Anxiety",
        "problem_type": "Job Crisis",
        "situation": "My contract ends next month and nobody has said whether it will be renewed.",
        "survey_score": {
            "seeker": {
                "initial_emotion_intensity": "4",
                "empathy": "5",
                "relevance": "4",
                "final_emotion_intensity": "2",
            },
            "supporter": {"relevance": "5"},
        },
        "dialog": [
            {"text": "Hello there.", "speaker": "sys", "strategy": "Others"},
            {"text": "hi, I am stressed about work", "speaker": "usr"},
            {"text": "my contract might not be renewed", "speaker": "usr"},
            {"text": "That sounds stressful.", "speaker": "sys", "strategy": "Reflection of feelings"},
            {"text": "When will you know?", "speaker": "sys", "strategy": "Questions"},
            {"text": "in three weeks", "speaker": "usr"},
            {"text": "Could you ask your manager before then?", "speaker": "sys", "strategy": "Providing Suggestions"},
        ],
    }
    record.update(overrides)
    return record


def _test_tokenizer():
    """The default backbone's tokenizer; ESC_EVOLVE_TEST_TOKENIZER names a saved copy on machines without the
    packaged backbone (the GPU check carries only the tokenizer files, not the 98 MB GGUF)."""
    folder = os.environ.get("ESC_EVOLVE_TEST_TOKENIZER")
    if folder:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    from esc_evolve.config import ModelSettings
    from esc_evolve.models import load_tokenizer

    return load_tokenizer(ModelSettings())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama with the default backbone's tokenizer: fast, fully local. Its weights
    are so small that greedy decoding says the same thing whatever the prompt (`varied_model_dir` does not)."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def varied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with weights drawn 10x wider (std 0.2): its greedy replies differ from prompt to prompt, so
    a token a row should not see (padding, another row) changes what it says. For tests that compare outputs."""
    return _tiny_llama(tmp_path_factory.mktemp("varied-llama"), initializer_range=0.2)


def _tiny_llama(out: Path, initializer_range: float = 0.02) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _test_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory, varied_model_dir: Path) -> Path:
    """The tiny pipeline (one iteration, tests/pipeline_fixtures.py) run to its end in a subprocess with
    PYTHONHASHSEED=1: what the reproducibility and fault tests compare other runs with."""
    from tests.pipeline_fixtures import run_to_end

    return run_to_end(tmp_path_factory.mktemp("reference"), varied_model_dir, hash_seed=1)
