"""vLLM backend (optional extra `gpu`): continuous batching and paged attention on GPUs, LoRA via LoRARequest.

vllm is imported only when this backend is built, so the package works without it. What is vLLM-specific is
kept thin; what decides (which folder is served for which model, the engine's arguments, the token ids of each
prompt) is plain code, tested without vLLM.

- Models: the backbone is the engine's model; M_t is its served artifact (models/served.py), one LoRA holding the
  whole adapter chain (M2 = base + a0 + a1 + a2), sent as a `LoRARequest` with every request; a chain that a LoRA
  cannot express exactly is served as merged weights, which then are the engine's model.
- Prompts: token ids (`{"prompt_token_ids": ...}`), never text. Chats are encoded with `encode_prompt` (message
  text stays text, and the template's own BOS is the only one); a pre-rendered prompt is tokenised like the
  transformers backend does it: without special tokens when it already starts with the BOS (a Llama-3 template
  writes one; `LLM.generate(text)` would add a second), with them otherwise.
- Sampling is seeded per request (`SamplingParams.seed`), so a sampled reply does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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

# The values vLLM accepts for max_lora_rank (vllm/config/lora.py); a LoRA of a smaller rank is padded.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise GenerationError(
            "generation.backend is 'vllm' but vllm is not installed: `pip install -e '.[gpu]'` on a CUDA machine "
            "(or vLLM in its own environment, docs/scale.md), or use generation.backend=transformers"
        ) from None
    return vllm


@dataclass(frozen=True)
class ServingPlan:
    """What the engine loads (`model`) and which LoRA folder, if any, every request carries."""

    model: str
    revision: str | None
    lora: Path | None = None
    lora_rank: int | None = None
    name: str = "base"


def serving_plan(model_config: ModelSettings, adapter: Path | None) -> ServingPlan:
    """The backbone alone, or M_t as its served artifact (written first when a run made before it lacks one)."""
    from esc_evolve.models import resolve_backbone
    from esc_evolve.models.served import ensure_served

    if adapter is None:
        return ServingPlan(resolve_backbone(model_config.name, model_config.cache_dir), model_config.revision)
    artifact = ensure_served(model_config, Path(adapter))
    if artifact.kind == "merged":
        return ServingPlan(str(artifact.path), None, name=Path(adapter).name)
    backbone = resolve_backbone(artifact.base, model_config.cache_dir)
    revision = model_config.revision if artifact.base == model_config.name else None
    return ServingPlan(backbone, revision, artifact.path, artifact.rank, Path(adapter).name)


def engine_args(
    model_config: ModelSettings, config: GenerationSettings, plan: ServingPlan, seed: int
) -> dict[str, Any]:
    """vllm.LLM's keyword arguments: ours, then `generation.vllm.engine_kwargs` as given (they win)."""
    settings = config.vllm
    args: dict[str, Any] = {
        "model": plan.model,
        "revision": plan.revision,
        "dtype": model_config.dtype,  # vLLM also takes "auto"
        "trust_remote_code": model_config.trust_remote_code,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "seed": seed,
    }
    if settings.max_num_seqs is not None:
        args["max_num_seqs"] = settings.max_num_seqs
    if plan.lora is not None:
        args.update(enable_lora=True, max_lora_rank=vllm_lora_rank(plan.lora_rank or 16))
    return {**args, **settings.engine_kwargs}


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank` (a concatenated chain's rank is the sum)."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise GenerationError(f"a LoRA of rank {rank} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})")


def encode_rendered(tokenizer: Any, text: str) -> list[int]:
    """A pre-rendered prompt's ids with exactly one BOS where the tokenizer uses one: the template's, when the
    text starts with it, else the one the tokenizer adds (the transformers backend's rule)."""
    bos = tokenizer.bos_token
    special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


class VLLMGenerator(Generator):
    """Generate with vLLM; engine settings from `generation.vllm` (see docs/scale.md)."""

    _lora: Any = None

    def __init__(
        self,
        model_config: ModelSettings,
        config: GenerationSettings | None = None,
        adapter: str | Path | None = None,
        *,
        seed: int = 0,
    ) -> None:
        from esc_evolve.models import load_tokenizer

        vllm = import_vllm()
        self.config = config or GenerationSettings()
        self.seed = seed
        self.plan = serving_plan(model_config, Path(adapter) if adapter is not None else None)
        self.llm = vllm.LLM(**engine_args(model_config, self.config, self.plan, seed))
        # The tokenizer every prompt of this model is rendered with (the adapter's own when it saved one), as in
        # the transformers backend: prompts reach vLLM as ids, so its own tokenizer only detokenises.
        self.tokenizer = load_tokenizer(model_config, adapter)
        if self.plan.lora is not None:
            from vllm.lora.request import LoRARequest

            self._lora = LoRARequest(self.plan.name, 1, str(self.plan.lora))

    def generate(self, requests: Sequence[GenerationRequest], progress: bool = True) -> list[GenerationResult]:
        from vllm import SamplingParams

        params = [SamplingParams(**self._sampling(i, r)) for i, r in enumerate(requests)]
        prompts = [self._prompt(r) for r in requests]
        with GenerationProgress(len(requests), progress) as bar:
            outputs = self.llm.generate(prompts, params, lora_request=self._lora)
            results = [_result(r, o) for r, o in zip(requests, outputs, strict=True)]
            bar.advance(len(results), sum(r.num_tokens for r in results))
        return results

    def _prompt(self, request: GenerationRequest) -> dict[str, list[int]]:
        """vLLM's `TokensPrompt`: token ids used as they are, for chats and pre-rendered prompts alike."""
        if request.messages is None:
            return {"prompt_token_ids": encode_rendered(self.tokenizer, request.prompt or "")}
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
