"""One self-improvement iteration's data: answer (y) -> reflect -> refine (y') -> filter -> pairs.

For each dialogue context C, M_t answers directly (y, the rejected side), reflects field by field under the
principles, and writes y' (the chosen side) as its next turn with the reflection in the system message. Every
sample is appended to `iterN/pairs.jsonl` as soon as its chunk finishes, so a killed run resumes without
redoing or losing a finished sample. The DPO prompt is C alone (system prompt + dialogue): the evolved model
must answer personally without the explicit reflection.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from esc_evolve.config import ExperimentConfig
from esc_evolve.data import TurnSample, build_turn_samples, load_conversations
from esc_evolve.data.prompts import build_messages, render_prompt
from esc_evolve.data.schema import Turn
from esc_evolve.evolve.filters import decide_pair
from esc_evolve.evolve.pairs import PairRecord, PairStore
from esc_evolve.evolve.principles import Principles, ReflectionField, load_principles
from esc_evolve.evolve.refinement import refinement_system
from esc_evolve.evolve.reflection import Reflection, build_reflection, reflection_messages
from esc_evolve.generation.types import GenerationRequest, GenerationResult, Generator

log = logging.getLogger(__name__)


def select_contexts(config: ExperimentConfig, iteration: int) -> list[TurnSample]:
    """The contexts of iteration `iteration` (1-based): a seeded shuffle of the training samples, a fresh slice
    per iteration when `evolve.new_contexts_each_iteration` (wrapping around when the data runs out)."""
    conversations = load_conversations(
        config.data.train_path, skip_invalid=config.data.skip_invalid, limit=config.data.max_conversations
    ).conversations
    samples = build_turn_samples(conversations, config.data.context_window)
    random.Random(config.run.seed).shuffle(samples)
    k = min(config.evolve.contexts_per_iteration, len(samples))
    start = (iteration - 1) * k if config.evolve.new_contexts_each_iteration else 0
    return [samples[(start + i) % len(samples)] for i in range(k)]


def generate_pairs(
    config: ExperimentConfig,
    iteration: int,
    generator: Generator,
    tokenizer: Any,
    store: PairStore,
    principles: Principles | None = None,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """Fill `store` with one record per selected context (skipping those already there); return counts."""
    principles = principles or load_principles(config.evolve.principles_path)
    contexts = select_contexts(config, iteration)
    done = store.done_ids()
    todo = [s for s in contexts if s.sample_id not in done]
    log.info("iteration %d: %d contexts, %d already done", iteration, len(contexts), len(contexts) - len(todo))
    chunk_size = chunk_size or config.generation.batch_size
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        store.append(_process_chunk(config, iteration, generator, tokenizer, principles, chunk))
        log.info("iteration %d: %d/%d contexts done", iteration, len(done) + start + len(chunk), len(contexts))
    return summarise(store, iteration)


def _process_chunk(
    config: ExperimentConfig,
    iteration: int,
    generator: Generator,
    tokenizer: Any,
    principles: Principles,
    chunk: Sequence[TurnSample],
) -> list[PairRecord]:
    system = config.data.system_prompt
    prompts = [build_messages(s.context, system) for s in chunk]
    drafts = generator.generate(
        [GenerationRequest(messages=p, id=s.sample_id) for p, s in zip(prompts, chunk, strict=True)]
    )
    reflections = _reflect(generator, tokenizer, principles, chunk, [d.text for d in drafts], config)
    refine_systems = [
        refinement_system(system, principles, r, d.text) for r, d in zip(reflections, drafts, strict=True)
    ]
    refined = generator.generate(
        [
            GenerationRequest(
                messages=build_messages(s.context, rs),
                temperature=config.evolve.refine_temperature,
                top_p=config.evolve.refine_top_p,
                seed=config.run.seed + iteration,
                id=s.sample_id,
            )
            for s, rs in zip(chunk, refine_systems, strict=True)
        ]
    )
    return [
        _record(config, iteration, principles, *item)
        for item in zip(chunk, prompts, drafts, reflections, refine_systems, refined, strict=True)
    ]


def _reflect(
    generator: Generator,
    tokenizer: Any,
    principles: Principles,
    chunk: Sequence[TurnSample],
    drafts: list[str],
    config: ExperimentConfig,
) -> list[Reflection]:
    """All fields of all contexts in one batched call; each answer starts after the field's fixed prefix."""
    requests = []
    max_context = getattr(generator, "max_context", None)
    for sample, draft in zip(chunk, drafts, strict=True):
        for field in principles.reflection_fields:
            max_new = min(field.max_new_tokens, config.evolve.reflection_max_new_tokens)
            budget = max_context - max_new if max_context else None
            requests.append(
                GenerationRequest(
                    prompt=reflection_prompt(tokenizer, field, sample.context, principles, draft, budget),
                    max_new_tokens=max_new,
                    temperature=0.0,
                    stop=("\n",),
                    id=f"{sample.sample_id}:{field.name}",
                )
            )
    results = iter(generator.generate(requests))
    reflections = []
    for _ in chunk:
        raw = {field.name: next(results).text for field in principles.reflection_fields}
        reflections.append(build_reflection(principles, raw))
    return reflections


def reflection_prompt(
    tokenizer: Any,
    field: ReflectionField,
    context: Sequence[Turn],
    principles: Principles,
    draft: str,
    budget: int | None,
) -> str:
    """One field's prompt, rendered (the answer must start after the field's prefix, so the engine cannot trim it
    as it trims chat turns): the oldest turns of the quoted dialogue are dropped until it fits `budget` tokens.
    The last turn is always kept; a prompt that still does not fit is left to the engine's clear error."""
    turns = list(context)
    while True:
        prompt = render_prompt(tokenizer, reflection_messages(field, turns, principles, draft)) + field.prefix
        if budget is None or len(turns) <= 1 or len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= budget:
            return prompt
        turns = turns[1:]


def _record(
    config: ExperimentConfig,
    iteration: int,
    principles: Principles,
    sample: TurnSample,
    prompt: list[dict[str, str]],
    draft: GenerationResult,
    reflection: Reflection,
    refine_system: str,
    refined: GenerationResult,
) -> PairRecord:
    decision = decide_pair(
        refined.text,
        draft.text,
        reflection_parsed=reflection.parsed,
        chosen_finish=refined.finish_reason,
        rejected_finish=draft.finish_reason,
        filters=config.evolve.filters,
        seeker_text="\n".join(turn.text for turn in sample.context if turn.speaker == "seeker"),
    )
    return PairRecord(
        sample_id=sample.sample_id,
        iteration=iteration,
        principles_version=principles.version,
        prompt=prompt,
        rejected=draft.text.strip(),
        rejected_finish=draft.finish_reason,
        reflection=reflection.to_dict(),
        refine_system=refine_system,
        chosen=refined.text.strip(),
        chosen_finish=refined.finish_reason,
        keep=decision.keep,
        reasons=decision.reasons,
        rejected_degenerate=decision.rejected_degenerate,
        gold={
            "emotion_type": sample.profile.emotion_type,
            "problem_type": sample.profile.problem_type,
            "situation": sample.profile.situation,
            "human_response": sample.response,
            "strategy": sample.strategy,
        },
    )


def summarise(store: PairStore, iteration: int) -> dict[str, Any]:
    """Counts for the issue note and `stages.json`: parse rate, pairs kept, drop reasons, degenerate drafts."""
    records = list(store.read())
    total = len(records)
    reasons = Counter(reason for r in records for reason in r.reasons)
    fields = Counter((name, parse["status"]) for r in records for name, parse in r.reflection.get("fields", {}).items())
    return {
        "iteration": iteration,
        "contexts": total,
        "reflection_parse_rate": _rate(sum(r.reflection.get("parsed", False) for r in records), total),
        "field_parse_rate": {name: _rate(fields[(name, "ok")], total) for name in sorted({n for n, _ in fields})},
        "kept": sum(r.keep for r in records),
        "dropped_by_reason": dict(reasons.most_common()),
        "rejected_degenerate": dict(Counter(r.rejected_degenerate for r in records if r.rejected_degenerate)),
        "chosen_degenerate_rate": _rate(sum(any(x.startswith("chosen_") for x in r.reasons) for r in records), total),
    }


def _rate(part: int, total: int) -> float:
    return round(part / total, 4) if total else 0.0


def pairs_paths(run_path: Path, iteration: int) -> tuple[Path, Path]:
    folder = run_path / f"iter{iteration}"
    return folder / "pairs.jsonl", folder / "preference.jsonl"
