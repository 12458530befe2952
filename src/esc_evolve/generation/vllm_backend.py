"""vLLM backend (optional extra `gpu`): continuous batching and paged attention on GPUs, LoRA via LoRARequest.

vllm is imported only when this backend is built, so the package works without it. Sampling is seeded per
request (vLLM's `SamplingParams.seed`), so a sampled reply does not depend on its batch either. Chat requests
reach vLLM as token ids (`encode_prompt`), not as messages for `LLM.chat`, whose rendered text would turn a
control-token spelling in a message into the control token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from esc_evolve.config import GenerationSettings, ModelSettings
from esc_evolve.data.prompts import encode_prompt
from esc_evolve.generation.progress import GenerationProgress
from esc_evolve.generation.types import (
    FinishReason,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    Generator,
    cut_at_stop,
)


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise GenerationError(
            "generation.backend is 'vllm' but vllm is not installed: `pip install -e '.[gpu]'` on a CUDA machine, "
            "or use generation.backend=transformers"
        ) from None
    return vllm


class VLLMGenerator(Generator):
    """Generate with vLLM. `tensor_parallel_size` and `gpu_memory_utilization` come from the generation config."""

    def __init__(
        self,
        model_config: ModelSettings,
        config: GenerationSettings | None = None,
        adapter: str | Path | None = None,
        *,
        seed: int = 0,
    ) -> None:
        from esc_evolve.models import resolve_backbone

        vllm = import_vllm()
        self.config = config or GenerationSettings()
        self.seed = seed
        self.adapter = Path(adapter) if adapter is not None else None
        engine_args: dict[str, Any] = {
            "model": resolve_backbone(model_config.name, model_config.cache_dir),
            "revision": model_config.revision,
            "dtype": "auto" if model_config.dtype == "auto" else model_config.dtype,
            "trust_remote_code": model_config.trust_remote_code,
            "tensor_parallel_size": self.config.vllm.tensor_parallel_size,
            "gpu_memory_utilization": self.config.vllm.gpu_memory_utilization,
            "seed": seed,
        }
        if self.adapter is not None:
            engine_args.update(enable_lora=True, max_lora_rank=_lora_rank(self.adapter))
        self.llm = vllm.LLM(**engine_args)
        self.tokenizer = self.llm.get_tokenizer()
        self._lora = None
        if self.adapter is not None:
            from vllm.lora.request import LoRARequest

            self._lora = LoRARequest("adapter", 1, str(self.adapter))

    def generate(self, requests: Sequence[GenerationRequest], progress: bool = True) -> list[GenerationResult]:
        from vllm import SamplingParams

        params = [SamplingParams(**self._sampling(i, r)) for i, r in enumerate(requests)]
        prompts = [self._prompt(r) for r in requests]
        with GenerationProgress(len(requests), progress) as bar:
            outputs = self.llm.generate(prompts, params, lora_request=self._lora)
            results = [_result(r, o) for r, o in zip(requests, outputs, strict=True)]
            bar.advance(len(results), sum(r.num_tokens for r in results))
        return results

    def _prompt(self, request: GenerationRequest) -> str | dict[str, list[int]]:
        """A pre-rendered prompt as text; a chat as vLLM's `TokensPrompt` (token ids used as they are)."""
        if request.messages is None:
            return request.prompt or ""
        return {"prompt_token_ids": encode_prompt(self.tokenizer, request.messages, continuation=request.continuation)}

    def _sampling(self, index: int, request: GenerationRequest) -> dict[str, Any]:
        cfg = self.config
        temperature = cfg.temperature if request.temperature is None else request.temperature
        return {
            "max_tokens": request.max_new_tokens or cfg.max_new_tokens,
            "temperature": temperature,
            "top_p": cfg.top_p if request.top_p is None else request.top_p,
            "repetition_penalty": cfg.repetition_penalty,
            "stop": list(request.stop) or None,
            "seed": request.seed if request.seed is not None else self.seed + index,
        }

    def close(self) -> None:
        self.llm = None


def _result(request: GenerationRequest, output: Any) -> GenerationResult:
    completion = output.outputs[0]
    reason: FinishReason = "length" if completion.finish_reason == "length" else "stop"
    if isinstance(getattr(completion, "stop_reason", None), str):
        reason = "stop_string"
    text, hit = cut_at_stop(completion.text, request.stop)
    return GenerationResult(
        text=text,
        num_tokens=len(completion.token_ids),
        finish_reason="stop_string" if hit else reason,
        request_id=request.id,
        prompt_tokens=len(output.prompt_token_ids or []),
        token_ids=tuple(completion.token_ids),
    )


def _lora_rank(adapter: Path) -> int:
    """vLLM sizes its LoRA buffers by the largest rank it will serve; read it from the adapter."""
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise GenerationError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    rank = int(json.loads(config_file.read_text(encoding="utf-8")).get("r", 16))
    return 1 << max(3, (rank - 1).bit_length())  # vLLM accepts powers of two from 8 up
