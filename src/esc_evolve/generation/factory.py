"""Pick and build a generation backend from the config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from esc_evolve.config import GenerationConfig, ModelConfig
from esc_evolve.generation.types import GenerationError, Generator

log = logging.getLogger(__name__)


def build_generator(
    model_config: ModelConfig,
    generation_config: GenerationConfig,
    adapter: str | Path | None = None,
    *,
    seed: int = 0,
) -> Generator:
    """The backend named by `generation_config.backend`, with `adapter` (a peft LoRA folder) applied.

    `seed` seeds sampled requests that carry no seed of their own (pass `run.seed`).
    """
    backend = generation_config.backend
    if backend == "transformers":
        from esc_evolve.generation.hf import TransformersGenerator

        merge = generation_config.merge_adapter
        model, tokenizer = load_for_generation(model_config, adapter, merge=merge)
        return TransformersGenerator(
            model,
            tokenizer,
            generation_config,
            seed=seed,
            static_cache=generation_config.static_cache,
            share_prefix_min=generation_config.share_prefix_min,
            row_prefill=generation_config.row_prefill,
        )
    if backend == "vllm":
        from esc_evolve.generation.vllm_backend import VLLMGenerator

        return VLLMGenerator(model_config, generation_config, adapter, seed=seed)
    if backend == "openai":
        from esc_evolve.generation.openai_backend import OpenAIGenerator

        if adapter is not None:
            raise GenerationError("the openai backend serves a remote model: it cannot apply a local adapter")
        return OpenAIGenerator.from_config(model_config, generation_config)
    raise GenerationError(f"unknown generation backend {backend!r} (expected transformers, vllm or openai)")


def load_for_generation(
    model_config: ModelConfig, adapter: str | Path | None = None, *, merge: bool = True
) -> tuple[Any, Any]:
    """(model, tokenizer) ready to generate. With `merge`, the LoRA adapter is folded into the weights of the
    freshly loaded model (peft's merge_and_unload): the same function, without an extra adapter matmul pair and
    Python hop per linear layer at every step. A tokenizer saved with the adapter takes precedence (training may
    have changed its chat template)."""
    from esc_evolve.models import load_model

    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise GenerationError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    model, tokenizer = load_model(model_config, adapter)
    if adapter is not None:
        tokenizer = _adapter_tokenizer(Path(adapter)) or tokenizer
        if merge:
            model = model.merge_and_unload()
            model.eval()
    return model, tokenizer


def _adapter_tokenizer(folder: Path) -> Any | None:
    if not (folder / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
