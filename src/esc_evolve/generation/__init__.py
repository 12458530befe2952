"""Text generation for every stage (evolve, evaluation, chat): one interface, three backends.

- `transformers` (default, CPU and GPU): batched `generate` with a KV cache, see `hf.py`.
- `vllm` (extra `gpu`): vLLM's engine with LoRA adapters and tensor parallelism.
- `openai`: any OpenAI-compatible HTTP server (LLM judges, remote models).

`build_generator(model, generation, adapter)` builds the backend `generation.backend` names, from a registry
(`register_backend`) that projects can extend.
"""

from esc_evolve.generation.factory import BACKENDS, build_generator, load_for_generation, register_backend
from esc_evolve.generation.types import (
    FinishReason,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    Generator,
)

__all__ = [
    "BACKENDS",
    "FinishReason",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "Generator",
    "build_generator",
    "load_for_generation",
    "register_backend",
]
