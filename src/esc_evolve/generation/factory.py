"""Backends registered by name, and the one way to build a generator from the config.

Like lm-evaluation-harness's model registry: a backend is a builder function registered under the name that
`generation.backend` takes. A project can register its own (`@register_backend("mine")`) and select it from a
config without touching this package.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from esc_evolve.config import GenerationSettings, ModelSettings
from esc_evolve.generation.types import GenerationError, Generator
from esc_evolve.registry import Registry

log = logging.getLogger(__name__)

BackendBuilder = Callable[[ModelSettings, GenerationSettings, Path | None, int], Generator]
# `builder(model, generation, adapter, seed) -> Generator`, selected by `generation.backend`.
BACKENDS: Registry[BackendBuilder] = Registry("generation backend", "generation.backend")
register_backend = BACKENDS.register


def build_generator(
    model: ModelSettings,
    generation: GenerationSettings,
    adapter: str | Path | None = None,
    *,
    seed: int = 0,
) -> Generator:
    """The backend named by `generation.backend`, with `adapter` (a peft LoRA folder) applied.

    `seed` seeds sampled requests that carry no seed of their own (pass `run.seed`).
    """
    builder = BACKENDS.get(generation.backend)
    return builder(model, generation, Path(adapter) if adapter is not None else None, seed)


@register_backend("transformers")
def _transformers(model: ModelSettings, generation: GenerationSettings, adapter: Path | None, seed: int) -> Generator:
    from esc_evolve.generation.hf import TransformersGenerator

    loaded, tokenizer = load_for_generation(model, adapter, merge=generation.transformers.merge_adapter)
    settings = generation.transformers
    return TransformersGenerator(
        loaded,
        tokenizer,
        generation,
        seed=seed,
        static_cache=settings.static_cache,
        share_prefix_min=settings.share_prefix_min,
        row_prefill=settings.row_prefill,
    )


@register_backend("vllm")
def _vllm(model: ModelSettings, generation: GenerationSettings, adapter: Path | None, seed: int) -> Generator:
    from esc_evolve.generation.vllm_backend import VLLMGenerator

    return VLLMGenerator(model, generation, adapter, seed=seed)


@register_backend("openai")
def _openai(model: ModelSettings, generation: GenerationSettings, adapter: Path | None, seed: int) -> Generator:
    from esc_evolve.generation.openai_backend import OpenAIGenerator

    return OpenAIGenerator.from_config(model, generation, adapter)  # adapter: the served name of that model


def requests_per_call(generation: GenerationSettings) -> int:
    """How many requests a stage should hand the backend at once (pairs: contexts per chunk): a batch for the
    transformers backend, `vllm.chunk_size` for vLLM's continuous batching, enough to keep every connection of
    an OpenAI-compatible farm busy."""
    if generation.backend == "vllm":
        return generation.vllm.chunk_size
    if generation.backend == "openai":
        return max(generation.batch_size, generation.openai.max_concurrency)
    return generation.batch_size


def load_for_generation(
    model: ModelSettings, adapter: str | Path | None = None, *, merge: bool = True
) -> tuple[Any, Any]:
    """(model, tokenizer) ready to generate. With `merge`, the LoRA adapter is folded into the weights of the
    freshly loaded model (peft's merge_and_unload): the same function, without an extra adapter matmul pair and
    Python hop per linear layer at every step."""
    from esc_evolve.models import load_model

    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise GenerationError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    return load_model(model, adapter, merge=merge)
