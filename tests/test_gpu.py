"""The CUDA path: generation, SFT, DPO and the whole pipeline on a GPU (skipped without one).

CI has no GPU; these run in the documented device check (`benchmarks/gpu_check.sh`, see benchmarks/README.md).
They use the tiny random model, so they check placement, dtypes and per-device defaults, not quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from esc_evolve.cli.app import app
from esc_evolve.config import ExperimentConfig, ModelSettings, validate_config
from esc_evolve.generation import build_generator, load_for_generation
from esc_evolve.models import load_model
from esc_evolve.training.settings import resolve_runtime
from tests.generation_fixtures import make_engine, naive_tokens, varied_requests

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on one)"),
]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def on_auto_device(config: ExperimentConfig) -> ExperimentConfig:
    raw = config.model_dump(mode="json")
    raw["model"]["device"] = "auto"
    return validate_config(raw, "<test>")


def test_auto_settings_pick_the_gpu_and_bf16(tiny_model_dir: Path) -> None:
    config = validate_config({"model": {"name": str(tiny_model_dir)}}, "<test>")
    runtime = resolve_runtime(config.model, config.sft)
    assert runtime.device.type == "cuda"
    assert runtime.bf16 is torch.cuda.is_bf16_supported()
    model, _ = load_model(config.model)
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)


def test_batched_greedy_equals_alone_on_the_gpu(tiny_model_dir: Path) -> None:
    model, tokenizer = load_for_generation(ModelSettings(name=str(tiny_model_dir), device="cuda", dtype="float32"))
    engine = make_engine(model, tokenizer, batch_size=4, max_new_tokens=16)
    requests = varied_requests(max_new_tokens=16)
    for request, result in zip(requests, engine.generate(requests, progress=False), strict=True):
        assert list(result.token_ids) == naive_tokens(model, tokenizer, request, engine.eos_ids), request.id


def test_bf16_generation_with_an_adapter_runs_on_the_gpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    from esc_evolve.config import GenerationSettings
    from tests.generation_fixtures import make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    model_config = ModelSettings(name=str(tiny_model_dir), device="cuda", dtype="bfloat16")
    generator = build_generator(model_config, GenerationSettings(max_new_tokens=8, temperature=0.0), adapter=adapter)
    results = generator.generate(varied_requests(max_new_tokens=8), progress=False)
    assert len(results) == 6 and all(0 < r.num_tokens <= 8 for r in results)


def test_sft_and_dpo_train_on_the_gpu(tmp_path: Path, tiny_model_dir: Path) -> None:
    from esc_evolve.pipeline import RunLayout
    from tests.sft_fixtures import tiny_config
    from tests.test_dpo import _config, _m0, _train, _write_pairs
    from tests.test_sft import _train as train_sft

    sft_config = on_auto_device(tiny_config(tmp_path, tiny_model_dir, bf16=None))  # bf16 per device
    summary = train_sft(sft_config, tmp_path / "sft")
    assert summary["runtime"]["bf16"] is torch.cuda.is_bf16_supported()
    assert summary["eval_loss"] < summary["base_eval_loss"]

    dpo_config = on_auto_device(_config(tmp_path, tiny_model_dir, bf16=None))
    run = RunLayout.of(dpo_config.run).root
    m0 = _m0(run, tiny_model_dir)
    _write_pairs(run)
    summary = _train(dpo_config, run, m0)
    assert summary["steps"] == 6 and summary["rewards_margins_last"] > summary["rewards_margins_first"]


def test_whole_pipeline_on_the_gpu(tmp_path: Path, tiny_model_dir: Path) -> None:
    overrides = [
        f"run.output_dir={tmp_path}",
        f"model.name={tiny_model_dir}",
        "model.device=auto",
        "sft.max_steps=2",
        "sft.max_eval_samples=4",
        "evolve.iterations=2",
        "evolve.contexts_per_iteration=4",
        "dpo.max_steps=2",
        "eval.max_contexts=6",
        "eval.bootstrap_samples=20",
        "eval.metrics=[bleu,distinct,length]",  # the embedding metrics need the 88 MB MiniLM package
        "generation.max_new_tokens=8",
        "data.context_window=3",
    ]
    args = ["run", str(CONFIGS / "quickstart.yaml")] + [arg for o in overrides for arg in ("--set", o)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stages = json.loads((tmp_path / "quickstart/stages.json").read_text())
    assert list(stages) == ["prepare", "sft", "iter1.pairs", "iter1.dpo", "iter2.pairs", "iter2.dpo", "eval"]
    assert (tmp_path / "quickstart/report.md").is_file()
