"""Judge backends registered by name, and the one way to build the judge `eval.judge` names.

Like lm-evaluation-harness's model registry: a backend is a builder function registered under the name that
`eval.judge.backend` takes; a project can register its own (`@register_judge("mine")`) and select it from a
config without touching this package. The built-in ones go through the generation layer, greedy, no adapter:

- `none`: no judge; the judge metric is skipped with a note.
- `local`: a local model (`build_generator`): the run's backbone (`model.name`) or `eval.judge.model`.
- `openai`: an OpenAI-compatible server: `generation.openai` with the fields set in `eval.judge.openai`. The API
  key is read from the environment variable `api_key_env` names when the judge is built, and only held in
  memory: configs, logs and reports carry the variable's name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from esc_evolve.config import GenerationSettings, JudgeSettings, ModelSettings, OpenAISettings
from esc_evolve.errors import ConfigError
from esc_evolve.evaluation.judge.base import Judge, Messages
from esc_evolve.generation import GenerationRequest, Generator, build_generator
from esc_evolve.registry import Registry

JudgeBuilder = Callable[[JudgeSettings, ModelSettings, GenerationSettings, int], Judge | None]
# `builder(settings, model, generation, seed) -> Judge | None`, selected by `eval.judge.backend`.
JUDGES: Registry[JudgeBuilder] = Registry("judge backend", "eval.judge.backend")
register_judge = JUDGES.register


def build_judge(
    settings: JudgeSettings, model: ModelSettings, generation: GenerationSettings, *, seed: int
) -> Judge | None:
    """The judge `settings.backend` names, ready to ask; None for `none`. Close it when done."""
    return JUDGES.get(settings.backend)(settings, model, generation, seed)


class GeneratorJudge(Judge):
    """A judge over a `Generator`, greedy: each `ask` is one `generate` call (a local model batches the prompts,
    a server answers them concurrently), with the generation progress bar when `progress`."""

    def __init__(self, generator: Generator, description: str, max_new_tokens: int, progress: bool = True) -> None:
        self.generator = generator
        self.description = description
        self.max_new_tokens = max_new_tokens
        self.progress = progress

    def ask(self, prompts: Sequence[Messages]) -> list[str]:
        if not prompts:
            return []
        requests = [
            GenerationRequest(messages=list(m), max_new_tokens=self.max_new_tokens, temperature=0.0) for m in prompts
        ]
        return [r.text for r in self.generator.generate(requests, progress=self.progress)]

    def close(self) -> None:
        self.generator.close()


@register_judge("none")
def _no_judge(settings: JudgeSettings, model: ModelSettings, generation: GenerationSettings, seed: int) -> None:
    return None


@register_judge("local")
def _local_judge(
    settings: JudgeSettings, model: ModelSettings, generation: GenerationSettings, seed: int
) -> GeneratorJudge:
    judge_model = model.model_copy(update={"name": settings.model, "revision": None}) if settings.model else model
    # `local` means weights on this machine: a run that generates through a server still judges locally.
    backend = "transformers" if generation.backend == "openai" else generation.backend
    greedy = _greedy(generation, settings.max_new_tokens, backend=backend)
    generator = build_generator(judge_model, greedy, None, seed=seed)
    description = f"local model {judge_model.name} ({backend}, greedy, no adapter)"
    return GeneratorJudge(generator, description, settings.max_new_tokens)


@register_judge("openai")
def _openai_judge(
    settings: JudgeSettings, model: ModelSettings, generation: GenerationSettings, seed: int
) -> GeneratorJudge:
    endpoint = judge_endpoint(settings, generation)
    if not endpoint.model:
        raise ConfigError(
            "eval.judge.backend=openai needs eval.judge.openai.model (the served model's name), "
            "or generation.openai.model"
        )
    greedy = _greedy(generation, settings.max_new_tokens, backend="openai", openai=endpoint)
    generator = build_generator(model, greedy, None, seed=seed)
    where = getattr(generator, "base_url", endpoint.base_url)
    description = f"{endpoint.model} at {where} (OpenAI-compatible, greedy)"
    return GeneratorJudge(generator, description, settings.max_new_tokens)


def judge_endpoint(settings: JudgeSettings, generation: GenerationSettings) -> OpenAISettings:
    """`generation.openai` updated with the fields `eval.judge.openai` sets explicitly (the rest are defaults,
    which must not override the generation endpoint)."""
    return generation.openai if settings.openai is None else settings.openai.over(generation.openai)


def _greedy(generation: GenerationSettings, max_new_tokens: int, **update: object) -> GenerationSettings:
    # A judge is deterministic whatever the responses were sampled with: no sampling, no repetition penalty.
    fixed = {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0, "max_new_tokens": max_new_tokens}
    return generation.model_copy(update={**fixed, **update})
