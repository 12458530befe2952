"""Judge backends: `eval.judge_backend` turned into the `judge(messages) -> str` callable `evaluate` takes, with a
`batch(prompts) -> list[str]` method through which the judge metric sends many prompts per `generate` call.

- `none`: no judge; the judge metric is skipped with a note.
- `local`: a local model through the generation layer (`build_generator`), base weights without adapter: the
  run's backbone (`model.name`), or the model `eval.judge_model` names. Greedy decoding.
- `openai`: an OpenAI-compatible server (`eval.judge_url`, `eval.judge_model`) through the generation layer's
  HTTP client, greedy. The API key is read from the environment variable `eval.judge_api_key_env` names (default
  `generation.openai_api_key_env`) and only held in memory: configs, logs and reports carry the variable's name.
"""

from __future__ import annotations

from collections.abc import Sequence

from esc_evolve.config import ExperimentConfig, GenerationConfig
from esc_evolve.errors import ConfigError
from esc_evolve.generation import GenerationRequest, Generator, build_generator


class GeneratorJudge:
    """A judge over a `Generator`, greedy: `judge(messages)` asks one prompt, `judge.batch(prompts)` many in one
    `generate` call (a local model batches them, a server answers them concurrently). `description` names it
    in the report; `progress` shows the generation progress bar of batched calls."""

    def __init__(self, generator: Generator, description: str, max_new_tokens: int, progress: bool = True) -> None:
        self.generator = generator
        self.description = description
        self.max_new_tokens = max_new_tokens
        self.progress = progress

    def __call__(self, messages: Sequence[dict[str, str]]) -> str:
        return self.generator.generate([self._request(messages)], progress=False)[0].text

    def batch(self, prompts: Sequence[Sequence[dict[str, str]]]) -> list[str]:
        """One answer per prompt, in order; raises if any request fails (the caller narrows it down)."""
        if not prompts:
            return []
        results = self.generator.generate([self._request(m) for m in prompts], progress=self.progress)
        return [r.text for r in results]

    def _request(self, messages: Sequence[dict[str, str]]) -> GenerationRequest:
        return GenerationRequest(messages=list(messages), max_new_tokens=self.max_new_tokens, temperature=0.0)

    def close(self) -> None:
        self.generator.close()

    def __enter__(self) -> GeneratorJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_judge(config: ExperimentConfig) -> GeneratorJudge | None:
    """The judge `config.eval.judge_backend` names, ready to call; None for `none`. Close it when done."""
    backend = config.eval.judge_backend
    if backend == "none":
        return None
    if backend == "local":
        return _local_judge(config)
    return _openai_judge(config)


def _greedy(generation: GenerationConfig, max_new_tokens: int, **update: object) -> GenerationConfig:
    # A judge is deterministic whatever the responses were sampled with: no sampling, no repetition penalty.
    return generation.model_copy(
        update={"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0, "max_new_tokens": max_new_tokens, **update}
    )


def _local_judge(config: ExperimentConfig) -> GeneratorJudge:
    judge_model = config.eval.judge_model
    model = config.model.model_copy(update={"name": judge_model, "revision": None}) if judge_model else config.model
    # `local` means weights on this machine: a run that generates through a server still judges locally.
    backend = "transformers" if config.generation.backend == "openai" else config.generation.backend
    generation = _greedy(config.generation, config.eval.judge_max_new_tokens, backend=backend)
    generator = build_generator(model, generation, None, seed=config.run.seed)
    description = f"local model {model.name} ({backend}, greedy, no adapter)"
    return GeneratorJudge(generator, description, generation.max_new_tokens)


def _openai_judge(config: ExperimentConfig) -> GeneratorJudge:
    eval_cfg, gen = config.eval, config.generation
    model = eval_cfg.judge_model or gen.openai_model
    if not model:
        raise ConfigError("eval.judge_backend=openai needs eval.judge_model (the served model's name)")
    generation = _greedy(
        gen,
        eval_cfg.judge_max_new_tokens,
        backend="openai",
        openai_base_url=eval_cfg.judge_url or gen.openai_base_url,
        openai_model=model,
        openai_api_key_env=eval_cfg.judge_api_key_env or gen.openai_api_key_env,
    )
    generator = build_generator(config.model, generation, None, seed=config.run.seed)
    where = getattr(generator, "base_url", generation.openai_base_url)
    return GeneratorJudge(generator, f"{model} at {where} (OpenAI-compatible, greedy)", generation.max_new_tokens)
