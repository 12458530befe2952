"""One self-improvement iteration's data: answer (y) -> reflect -> refine (y') -> filter -> pairs.

For each dialogue context C, M_t answers directly (y, the rejected side), reflects field by field under the
principles, and writes y' (the chosen side) as its next turn with the reflection in the system message. Every
sample is appended to `iterN/pairs.jsonl` as soon as its chunk finishes, so a killed run resumes without
redoing or losing a finished sample. The DPO prompt is C alone (system prompt + dialogue): the evolved model
must answer personally without the explicit reflection.

`generate_pairs(settings, contexts, generator, pairs_file, ...)` needs no run directory: the caller chooses the
contexts (`select_contexts`) and where the pairs go.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esc_evolve.config import EvolveSettings
from esc_evolve.data import TurnSample
from esc_evolve.data.prompts import build_messages, encode_prompt
from esc_evolve.data.schema import Turn
from esc_evolve.errors import ConfigError
from esc_evolve.evolve.filters import decide_pair, edit_ratio
from esc_evolve.evolve.pairs import PairRecord, PairStore, sample_seed
from esc_evolve.evolve.principles import Principles, ReflectionField, load_principles
from esc_evolve.evolve.refinement import plain_refinement_system, refinement_system
from esc_evolve.evolve.reflection import (
    Reflection,
    build_reflection,
    no_reflection,
    oracle_values,
    reflection_messages,
)
from esc_evolve.generation.types import GenerationRequest, GenerationResult, Generator
from esc_evolve.safety.detector import RiskDetector, default_detector

log = logging.getLogger(__name__)


def select_contexts(
    samples: Sequence[TurnSample], settings: EvolveSettings, seed: int, iteration: int
) -> list[TurnSample]:
    """The contexts of iteration `iteration` (1-based) among the training `samples`: a seeded shuffle, a fresh
    slice per iteration when `new_contexts_each_iteration` (wrapping around when the data runs out)."""
    shuffled = list(samples)
    random.Random(seed).shuffle(shuffled)
    k = min(settings.contexts_per_iteration, len(shuffled))
    start = (iteration - 1) * k if settings.new_contexts_each_iteration else 0
    return [shuffled[(start + i) % len(shuffled)] for i in range(k)]


@dataclass(frozen=True)
class PairJob:
    """What one iteration's pair generation needs besides the generator: the settings and the prompts' frame."""

    settings: EvolveSettings
    iteration: int
    seed: int
    system_prompt: str | None
    principles: Principles
    tokenizer: Any


def generate_pairs(
    settings: EvolveSettings,
    contexts: Sequence[TurnSample],
    generator: Generator,
    pairs_file: Path,
    *,
    iteration: int,
    seed: int,
    system_prompt: str | None,
    principles: Principles | None = None,
    tokenizer: Any = None,
    chunk_size: int = 16,
    risk_detector: RiskDetector | None = None,
    rejected: Mapping[str, GenerationResult] | None = None,
    rejected_model: str | None = None,
) -> dict[str, Any]:
    """Append one record per context to `pairs_file` (skipping contexts already there); return counts.

    Reflection prompts are measured with `tokenizer`, by default the generator's own (so prompt and model agree),
    when they must fit the generator's context. `chunk_size` contexts are processed per batch (the pipeline passes
    `generation.batch_size`). `rejected` (sample id -> reply of `rejected_model`) replaces M_t's own draft as the
    rejected side (evolve.rejected_from); M_t still reflects on and refines its own draft."""
    detector = risk_detector or default_detector()  # a chosen reply that ignores a seeker at risk is never kept
    job = pair_job(settings, generator, iteration, seed, system_prompt, principles, tokenizer)
    store = PairStore(pairs_file)
    done = store.done_ids()
    todo = [s for s in contexts if s.sample_id not in done]
    log.info("iteration %d: %d contexts, %d already done", iteration, len(contexts), len(contexts) - len(todo))
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        store.append(_process_chunk(job, generator, chunk, detector, rejected or {}, rejected_model))
        log.info("iteration %d: %d/%d contexts done", iteration, len(done) + start + len(chunk), len(contexts))
    return summarise(store, iteration)


def pair_job(
    settings: EvolveSettings,
    generator: Generator,
    iteration: int,
    seed: int,
    system_prompt: str | None,
    principles: Principles | None = None,
    tokenizer: Any = None,
) -> PairJob:
    """The job's frame, with the defaults filled: the generator's tokenizer and the packaged principles."""
    tokenizer = tokenizer if tokenizer is not None else generator.tokenizer
    if tokenizer is None and getattr(generator, "max_context", None):
        raise ConfigError("reflection prompts are fitted to the model's context with its tokenizer: pass tokenizer=")
    principles = principles or load_principles(settings.principles_path)
    return PairJob(settings, iteration, seed, system_prompt, principles, tokenizer)


@dataclass(frozen=True)
class Refined:
    """One context through answer -> reflect -> refine."""

    sample: TurnSample
    prompt: list[dict[str, str]]  # the system prompt and the dialogue: the DPO prompt
    draft: GenerationResult  # y
    reflection: Reflection
    refine_system: str
    refined: GenerationResult  # y'


def refine_chunk(job: PairJob, generator: Generator, chunk: Sequence[TurnSample]) -> list[Refined]:
    """M_t answers each context, reflects (as `evolve.reflection` says) and writes y', all batched."""
    settings = job.settings
    prompts = [build_messages(s.context, job.system_prompt) for s in chunk]
    drafts = generator.generate(
        [draft_request(p, s, job.seed + job.iteration) for p, s in zip(prompts, chunk, strict=True)]
    )
    reflections = _reflect(generator, job, chunk, [d.text for d in drafts])
    refine_systems = [_refine_system(job, r, d.text) for r, d in zip(reflections, drafts, strict=True)]
    refined = generator.generate(
        [
            GenerationRequest(
                messages=build_messages(s.context, rs),
                temperature=settings.refine_temperature,
                top_p=settings.refine_top_p,
                seed=job.seed + job.iteration,
                id=s.sample_id,
            )
            for s, rs in zip(chunk, refine_systems, strict=True)
        ]
    )
    items = zip(chunk, prompts, drafts, reflections, refine_systems, refined, strict=True)
    return [Refined(*item) for item in items]


def draft_request(prompt: list[dict[str, str]], sample: TurnSample, seed: int) -> GenerationRequest:
    """M_t's direct answer y to a context; seeded by the sample, so a sampled y is the same in any chunk or shard."""
    return GenerationRequest(messages=prompt, id=sample.sample_id, seed=sample_seed(seed, sample.sample_id))


def answer_with_refinement(
    settings: EvolveSettings,
    samples: Sequence[TurnSample],
    generator: Generator,
    *,
    seed: int,
    system_prompt: str | None,
    chunk_size: int = 16,
) -> list[Refined]:
    """M_t answering through draft, reflection and refinement at answer time (the inference-refine baseline, no
    DPO): y' is the reply. The same prompts and settings as an iteration's pairs (`evolve`), seeded as iteration 0."""
    job = pair_job(settings, generator, 0, seed, system_prompt)
    done: list[Refined] = []
    for start in range(0, len(samples), chunk_size):
        done += refine_chunk(job, generator, samples[start : start + chunk_size])
    return done


def _refine_system(job: PairJob, reflection: Reflection, draft: str) -> str:
    if job.settings.reflection == "none":
        return plain_refinement_system(job.system_prompt or "", draft)
    return refinement_system(job.system_prompt, job.principles, reflection, draft)


def _process_chunk(
    job: PairJob,
    generator: Generator,
    chunk: Sequence[TurnSample],
    detector: RiskDetector,
    rejected: Mapping[str, GenerationResult],
    rejected_model: str | None,
) -> list[PairRecord]:
    refined = refine_chunk(job, generator, chunk)
    risks = seekers_at_risk(detector, chunk)
    return [
        _record(job, item, risk, rejected.get(item.sample.sample_id), rejected_model)
        for item, risk in zip(refined, risks, strict=True)
    ]


def seekers_at_risk(detector: RiskDetector, chunk: Sequence[TurnSample]) -> list[bool]:
    """Whether the seeker's last message in each context is at risk (read with the one before as history), as
    evaluation's safety metric reads it: the reply answers that message."""
    said = [[t.text for t in s.context if t.speaker == "seeker"] or [""] for s in chunk]
    return [a.at_risk for a in detector.assess_many([s[-1] for s in said], [s[-2:-1] for s in said])]


def _reflect(generator: Generator, job: PairJob, chunk: Sequence[TurnSample], drafts: list[str]) -> list[Reflection]:
    """All fields of all contexts in one batched call; each answer continues the field's fixed prefix. With
    `evolve.reflection: oracle` the fields the gold profile answers are filled from it and not asked; with `none`
    nothing is asked."""
    if job.settings.reflection == "none":
        return [no_reflection() for _ in chunk]
    oracle = job.settings.reflection == "oracle"
    given = [oracle_values(s.profile) if oracle else {} for s in chunk]
    requests = []
    fields = job.principles.reflection_fields
    max_context = getattr(generator, "max_context", None)
    for sample, draft, gold in zip(chunk, drafts, given, strict=True):
        for field in (f for f in fields if f.name not in gold):
            max_new = min(field.max_new_tokens, job.settings.reflection_max_new_tokens)
            budget = max_context - max_new if max_context else None
            requests.append(
                GenerationRequest(
                    messages=reflection_prompt(job.tokenizer, field, sample.context, job.principles, draft, budget),
                    continuation=field.prefix,
                    max_new_tokens=max_new,
                    temperature=0.0,
                    stop=("\n",),
                    id=f"{sample.sample_id}:{field.name}",
                )
            )
    results = iter(generator.generate(requests) if requests else [])
    reflections = []
    for gold in given:
        raw = {field.name: next(results).text for field in fields if field.name not in gold}
        reflections.append(build_reflection(job.principles, raw, gold))
    return reflections


def reflection_prompt(
    tokenizer: Any,
    field: ReflectionField,
    context: Sequence[Turn],
    principles: Principles,
    draft: str,
    budget: int | None,
) -> list[dict[str, str]]:
    """One field's messages, answered after `field.prefix` (the request's continuation). The dialogue is quoted
    inside one user message, so the engine cannot trim it turn by turn: the oldest quoted turns are dropped until
    prompt and prefix fit `budget` tokens. The last turn is always kept; a prompt that still does not fit is left
    to the engine's clear error."""
    turns = list(context)
    while True:
        messages = reflection_messages(field, turns, principles, draft)
        if budget is None or len(turns) <= 1:
            return messages
        if len(encode_prompt(tokenizer, messages, continuation=field.prefix)) <= budget:
            return messages
        turns = turns[1:]


def _record(
    job: PairJob,
    item: Refined,
    seeker_at_risk: bool,
    anchor: GenerationResult | None = None,
    anchor_model: str | None = None,
) -> PairRecord:
    """The pair (y', y) of one context; `anchor`, when given, is the rejected side instead of M_t's draft."""
    sample, draft, refined = item.sample, item.draft, item.refined
    rejected = anchor or draft
    decision = decide_pair(
        refined.text,
        rejected.text,
        reflection_parsed=item.reflection.parsed,
        chosen_finish=refined.finish_reason,
        rejected_finish=rejected.finish_reason,
        filters=job.settings.filters,
        seeker_at_risk=seeker_at_risk,
    )
    return PairRecord(
        sample_id=sample.sample_id,
        iteration=job.iteration,
        principles_version=job.principles.version,
        prompt=item.prompt,
        rejected=rejected.text.strip(),
        rejected_finish=rejected.finish_reason,
        reflection=item.reflection.to_dict(),
        refine_system=item.refine_system,
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
        rejected_model=anchor_model if anchor is not None else None,
        draft=draft.text.strip() if anchor is not None else None,
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


def pair_statistics(records: Iterable[PairRecord]) -> dict[str, Any]:
    """What an iteration's pairs look like: kept and dropped (with reasons), the mean length in words of the chosen
    and rejected sides, and their similarity (1 - the word-level edit distance the `too_similar` filter reads),
    over the kept pairs (what DPO trains on) and over all contexts."""
    records = list(records)
    kept = [r for r in records if r.keep]
    return {
        "contexts": len(records),
        "kept": len(kept),
        "dropped": len(records) - len(kept),
        "dropped_by_reason": dict(Counter(reason for r in records for reason in r.reasons).most_common()),
        "kept_pairs": _side_statistics(kept),
        "all_contexts": _side_statistics(records),
    }


def _side_statistics(records: Sequence[PairRecord]) -> dict[str, float | None]:
    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    return {
        "chosen_words": mean([len(r.chosen.split()) for r in records]),
        "rejected_words": mean([len(r.rejected.split()) for r in records]),
        "similarity": mean([1.0 - edit_ratio(r.chosen, r.rejected) for r in records]),
    }


def _rate(part: int, total: int) -> float:
    return round(part / total, 4) if total else 0.0
