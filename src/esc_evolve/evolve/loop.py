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

import dataclasses
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
from esc_evolve.evolve.exemplars import Exemplar, for_context, load_exemplars, probe_samples
from esc_evolve.evolve.filters import PairDecision, decide_pair, edit_ratio, reflection_offer
from esc_evolve.evolve.grounding import Grounder
from esc_evolve.evolve.pairs import PairRecord, PairStore, sample_seed
from esc_evolve.evolve.principles import Principles, ReflectionField, load_principles
from esc_evolve.evolve.quality import check_statistics, reflection_quality
from esc_evolve.evolve.refinement import plain_refinement_system, refinement_system
from esc_evolve.evolve.reflection import (
    Reflection,
    ReflectionRules,
    build_reflection,
    no_reflection,
    oracle_values,
    parse_field,
    reflection_messages,
)
from esc_evolve.evolve.selection import pick_refinement, selection_record
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
    """What one iteration's pair generation needs besides the generator: the settings and the prompts' frame,
    the few-shot exemplars, the grounding check, and M_t's answers for the probe conversations (`with_probes`):
    (conversation id, field -> parsed answer)."""

    settings: EvolveSettings
    iteration: int
    seed: int
    system_prompt: str | None
    principles: Principles
    tokenizer: Any
    exemplars: tuple[Exemplar, ...] = ()
    grounder: Grounder | None = None
    probes: tuple[tuple[str, dict[str, str]], ...] = ()


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
    job = with_probes(job, generator)
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
    embedder: Any = None,
) -> PairJob:
    """The job's frame, with the defaults filled: the generator's tokenizer, the packaged principles and
    exemplars, and the grounding check (`embedder`: evaluation's packaged MiniLM when not given and needed)."""
    tokenizer = tokenizer if tokenizer is not None else generator.tokenizer
    if tokenizer is None and getattr(generator, "max_context", None):
        raise ConfigError("reflection prompts are fitted to the model's context with its tokenizer: pass tokenizer=")
    principles = principles or load_principles(settings.principles_path)
    reflecting = settings.reflection != "none"
    exemplars = load_exemplars(settings.reflection_exemplars) if reflecting else ()
    grounder = None
    if reflecting and settings.situation_grounding != "off":
        grounder = Grounder(
            settings.situation_grounding, settings.grounding_min_terms, settings.grounding_min_similarity, embedder
        )
    return PairJob(settings, iteration, seed, system_prompt, principles, tokenizer, exemplars, grounder)


def with_probes(job: PairJob, generator: Generator) -> PairJob:
    """The job with M_t's answers to its `distinct` fields for `evolve.generic_probes` built-in contexts: drafts
    and fields asked exactly as for any context (greedy), once per iteration. Seeded by the probe, so every shard
    and every resumed run compares against the same answers."""
    settings = job.settings
    fields = [f for f in job.principles.reflection_fields if f.check == "distinct"]
    if settings.reflection == "none" or not settings.generic_probes or not fields:
        return job
    probes = probe_samples(settings.generic_probes, [e.conversation_id for e in job.exemplars])
    drafts = generator.generate(
        [
            GenerationRequest(
                messages=build_messages(p.context, job.system_prompt),
                id=f"probe:{p.sample_id}",
                seed=sample_seed(job.seed + job.iteration, f"probe:{p.sample_id}"),
            )
            for p in probes
        ]
    )
    requests = [
        field_request(job, generator, field, probe, draft.text, f"probe:{probe.sample_id}:{field.name}", None)
        for probe, draft in zip(probes, drafts, strict=True)
        for field in fields
    ]
    answers = iter(generator.generate(requests))
    found = []
    for probe in probes:
        parsed = {field.name: parse_field(field, next(answers).text) for field in fields}
        found.append((probe.conversation_id, {n: p.value for n, p in parsed.items() if p.status == "ok" and p.value}))
    log.info("iteration %d: %d probe contexts for generic answers", job.iteration, len(probes))
    return dataclasses.replace(job, probes=tuple(found))


@dataclass(frozen=True)
class Refined:
    """One context through answer -> reflect -> refine."""

    sample: TurnSample
    prompt: list[dict[str, str]]  # the system prompt and the dialogue: the DPO prompt
    draft: GenerationResult  # y
    reflection: Reflection
    refine_system: str
    candidates: tuple[GenerationResult, ...]  # the sampled y' (evolve.refinement_samples)
    refined: GenerationResult  # y': the first candidate until `choose_refinement` picks one


def refine_chunk(job: PairJob, generator: Generator, chunk: Sequence[TurnSample]) -> list[Refined]:
    """M_t answers each context, reflects (as `evolve.reflection` says) and writes n candidate y', all batched."""
    prompts = [build_messages(s.context, job.system_prompt) for s in chunk]
    drafts = generator.generate(
        [draft_request(p, s, job.seed + job.iteration) for p, s in zip(prompts, chunk, strict=True)]
    )
    reflections = _reflect(generator, job, chunk, [d.text for d in drafts])
    refine_systems = [_refine_system(job, r, d.text) for r, d in zip(reflections, drafts, strict=True)]
    n = job.settings.refinement_samples
    requests = [refine_request(job, s, rs, i) for s, rs in zip(chunk, refine_systems, strict=True) for i in range(n)]
    results = generator.generate(requests)
    candidates = [tuple(results[i * n : (i + 1) * n]) for i in range(len(chunk))]
    return [
        Refined(sample, prompt, draft, reflection, system, found, found[0])
        for sample, prompt, draft, reflection, system, found in zip(
            chunk, prompts, drafts, reflections, refine_systems, candidates, strict=True
        )
    ]


def refine_request(job: PairJob, sample: TurnSample, refine_system: str, index: int) -> GenerationRequest:
    """The `index`-th sampled y' of a context. The first is seeded as y' always was (so one sample gives the pairs
    it gave before); the others by their own id, the same in any chunk or shard."""
    settings, seed = job.settings, job.seed + job.iteration
    request_id = sample.sample_id if index == 0 else f"{sample.sample_id}~refine{index}"
    return GenerationRequest(
        messages=build_messages(sample.context, refine_system),
        temperature=settings.refine_temperature,
        top_p=settings.refine_top_p,
        seed=seed if index == 0 else sample_seed(seed, request_id),
        id=request_id,
    )


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
    job = with_probes(pair_job(settings, generator, 0, seed, system_prompt), generator)
    done: list[Refined] = []
    for start in range(0, len(samples), chunk_size):
        done += refine_chunk(job, generator, samples[start : start + chunk_size])
    # With several y', the same rule as the loop's picks one (the safety layer answers at-risk seekers in use).
    return [dataclasses.replace(item, refined=choose_refinement(job, item, item.draft, False)[0]) for item in done]


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
    """All fields of all contexts in one batched call; each answer continues the field's fixed prefix, k of them
    per field with self-consistency (`evolve.reflection_samples`). With `evolve.reflection: oracle` the fields the
    gold profile answers are filled from it and not asked; with `none` nothing is asked."""
    if job.settings.reflection == "none":
        return [no_reflection() for _ in chunk]
    oracle = job.settings.reflection == "oracle"
    given = [oracle_values(s.profile) if oracle else {} for s in chunk]
    k = job.settings.reflection_samples
    fields = job.principles.reflection_fields
    requests = [
        field_request(job, generator, field, sample, draft, _answer_id(sample.sample_id, field.name, i, k), i)
        for sample, draft, gold in zip(chunk, drafts, given, strict=True)
        for field in fields
        if field.name not in gold
        for i in range(k)
    ]
    results = iter(generator.generate(requests) if requests else [])
    reflections = []
    for sample, gold in zip(chunk, given, strict=True):
        raw = {field.name: [next(results).text for _ in range(k)] for field in fields if field.name not in gold}
        reflections.append(build_reflection(job.principles, raw, gold, reflection_rules(job, sample)))
    return reflections


def field_request(
    job: PairJob,
    generator: Generator,
    field: ReflectionField,
    sample: TurnSample,
    draft: str,
    request_id: str,
    sample_index: int | None,
) -> GenerationRequest:
    """One answer to one field: greedy when one answer is asked (or for a probe: `sample_index` None), else the
    `sample_index`-th of k sampled answers, seeded by its id so that it is the same in any chunk or shard."""
    settings = job.settings
    max_new = min(field.max_new_tokens, settings.reflection_max_new_tokens)
    max_context = getattr(generator, "max_context", None)
    budget = max_context - max_new if max_context else None
    exemplars = shown_exemplars(job, field, sample.conversation_id)
    sampled = sample_index is not None and settings.reflection_samples > 1
    return GenerationRequest(
        messages=reflection_prompt(job.tokenizer, field, sample.context, job.principles, draft, budget, exemplars),
        continuation=field.prefix,
        max_new_tokens=max_new,
        temperature=settings.reflection_temperature if sampled else 0.0,
        seed=sample_seed(job.seed + job.iteration, request_id) if sampled else None,
        stop=("\n",),
        id=request_id,
    )


def shown_exemplars(job: PairJob, field: ReflectionField, conversation_id: str) -> tuple[Exemplar, ...]:
    """The exemplars a field of this context is shown: none of its own conversation, and for a labelled field only
    with `evolve.exemplars_for_labels` (a small model answers the last exemplar's label)."""
    if field.options and not field.open and not job.settings.exemplars_for_labels:
        return ()
    return for_context(job.exemplars, conversation_id)


def _answer_id(sample_id: str, field: str, index: int, k: int) -> str:
    """`SAMPLE:FIELD` for a single answer (as before self-consistency), `SAMPLE~I:FIELD` for the i-th of k."""
    return f"{sample_id}:{field}" if k == 1 else f"{sample_id}~{index}:{field}"


def reflection_rules(job: PairJob, sample: TurnSample) -> ReflectionRules:
    """The checks of one context's answers: its seeker's turns, and the probes of other conversations."""
    probes: dict[str, list[str]] = {}
    for conversation, answers in job.probes:
        if conversation != sample.conversation_id:
            for name, value in answers.items():
                probes.setdefault(name, []).append(value)
    settings = job.settings
    shown = {
        f.name: [e.answers[f.name] for e in shown_exemplars(job, f, sample.conversation_id) if f.name in e.answers]
        for f in job.principles.reflection_fields
    }
    return ReflectionRules(
        seeker_texts=seeker_texts(sample.context),
        grounder=job.grounder,
        probes=probes,
        shown=shown,
        generic_similarity=settings.generic_similarity,
        min_agreement=settings.reflection_min_agreement,
        min_text_agreement=settings.reflection_min_text_agreement,
    )


def seeker_texts(context: Sequence[Turn]) -> tuple[str, ...]:
    return tuple(t.text for t in context if t.speaker == "seeker")


def reflection_prompt(
    tokenizer: Any,
    field: ReflectionField,
    context: Sequence[Turn],
    principles: Principles,
    draft: str,
    budget: int | None,
    exemplars: Sequence[Exemplar] = (),
) -> list[dict[str, str]]:
    """One field's messages, answered after `field.prefix` (the request's continuation). The dialogue is quoted
    inside one user message, so the engine cannot trim it turn by turn: the oldest quoted turns are dropped until
    prompt and prefix fit `budget` tokens, then the exemplars, last first. The last turn is always kept; a prompt
    that still does not fit is left to the engine's clear error."""
    turns, shown = list(context), list(exemplars)
    while True:
        messages = reflection_messages(field, turns, principles, draft, shown)
        if budget is None or (len(turns) <= 1 and not shown):
            return messages
        if len(encode_prompt(tokenizer, messages, continuation=field.prefix)) <= budget:
            return messages
        if len(turns) > 1:
            turns = turns[1:]
        else:
            shown = shown[:-1]


def _record(
    job: PairJob,
    item: Refined,
    seeker_at_risk: bool,
    anchor: GenerationResult | None = None,
    anchor_model: str | None = None,
) -> PairRecord:
    """The pair (y', y) of one context; `anchor`, when given, is the rejected side instead of M_t's draft."""
    sample, draft = item.sample, item.draft
    rejected = anchor or draft
    refined, decision = choose_refinement(job, item, rejected, seeker_at_risk)
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
        checks=decision.checks,
    )


def choose_refinement(
    job: PairJob, item: Refined, rejected: GenerationResult, seeker_at_risk: bool
) -> tuple[GenerationResult, PairDecision]:
    """The candidate y' the pair takes and the filters' decision on it (evolve/selection.py: with one candidate,
    that one). With several, the decision's checks record the choice under `refinement`."""
    reflected = job.settings.reflection != "none"
    offer = reflection_offer(item.reflection, job.principles) if reflected else None
    decisions = [
        decide_pair(
            candidate.text,
            rejected.text,
            reflection_parsed=item.reflection.parsed,
            chosen_finish=candidate.finish_reason,
            rejected_finish=rejected.finish_reason,
            filters=job.settings.filters,
            seeker_at_risk=seeker_at_risk,
            seeker_texts=seeker_texts(item.sample.context),
            offer=offer,
        )
        for candidate in item.candidates
    ]
    if len(decisions) == 1:
        return item.candidates[0], decisions[0]
    picked = pick_refinement([c.text for c in item.candidates], rejected.text, decisions)
    decision = decisions[picked]
    decision.checks["refinement"] = selection_record(picked, decisions)
    return item.candidates[picked], decision


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
        "reflection_quality": reflection_quality(records),
        "checks": check_statistics(records),
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
        "reflection_quality": reflection_quality(records),
        "checks": check_statistics(records),
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
