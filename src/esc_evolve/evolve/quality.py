"""What an iteration's reflections and pairs look like: the figures `summarise` and `pair_statistics` report.

Reflection quality compares the inferred emotion and problem with the seeker's gold profile (`record.gold`, which
no prompt and no filter ever reads: these numbers are reported, never used to select), and counts generic answers:
a situation that names nothing the seeker said, a profile or critique that repeats M_t's answer for an unrelated
conversation, and, measured after the fact over the whole iteration, answers said near-verbatim to many contexts
(`recurrence`: the symptom the probes are meant to catch within the loop).
Check statistics say how often y' used the reflection, how often a side spoke as the seeker, whether the kept
y' are shorter than y (what DPO would learn as "better"), and, with several sampled y', how the choice went.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import mean
from typing import Any

from esc_evolve.evolve.pairs import PairRecord
from esc_evolve.evolve.reflection import ORACLE_RAW
from esc_evolve.text import edit_ratio, words

RECUR_SIMILARITY = 0.7  # word-level similarity of two answers said near-verbatim (as evolve.generic_similarity)
RECUR_MIN_OTHERS = 3  # an answer recurs when this many other contexts of the iteration got it near-verbatim
_FREE_TEXT = ("situation", "profile", "critique")


def reflection_quality(records: Sequence[PairRecord]) -> dict[str, Any]:
    """Emotion and problem match with the gold profile, generic and recurring answers, agreement of k answers."""
    return quality_of([r.reflection for r in records], [r.gold for r in records])


def quality_of(reflections: Sequence[dict[str, Any]], golds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`reflection_quality` of reflections as `Reflection.to_dict()` writes them, with their contexts' gold
    profiles (`emotion_type`, `problem_type`)."""
    fields = [r.get("fields", {}) for r in reflections]
    names = sorted({name for f in fields for name in f})
    return {
        "contexts": len(fields),
        "parse_rate": _share(r.get("parsed", False) for r in reflections),
        **gold_matches(fields, golds),
        "generic_rate": {n: _share(f.get(n, {}).get("status") == "generic" for f in fields) for n in names},
        "recurrence": {n: recurrence([_answer(f.get(n)) for f in fields]) for n in _FREE_TEXT if n in names},
        "agreement": {
            n: round(mean(a), 4)
            for n in names
            if (a := [f[n]["agreement"] for f in fields if f.get(n, {}).get("agreement") is not None])
        },
    }


def gold_matches(fields: Sequence[dict[str, Any]], golds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Share of contexts whose parsed emotion names the gold emotion type, and whose situation names the gold
    problem type (evaluation's reflection metric, `matching.label_matches`): over contexts where both exist (as
    evaluation reports it), and over all contexts with a gold label (`_all`)."""
    from esc_evolve.evaluation.matching import label_matches  # evaluation is heavy to import; only needed here

    emotion, problem = [], []
    for found, gold in zip(fields, golds, strict=True):
        emotion.append(label_matches(_value(found, "emotion"), gold.get("emotion_type"), "emotion"))
        problem.append(label_matches(_value(found, "situation"), gold.get("problem_type"), "problem"))
    with_emotion = sum(bool(g.get("emotion_type")) for g in golds)
    with_problem = sum(bool(g.get("problem_type")) for g in golds)
    return {
        "emotion_match": _share(m for m in emotion if m is not None),
        "emotion_matched_of": sum(m is not None for m in emotion),
        # of every context with a gold label: an emotion that did not parse counts as a miss
        "emotion_match_all": round(sum(bool(m) for m in emotion) / with_emotion, 4) if with_emotion else None,
        "problem_match": _share(m for m in problem if m is not None),
        "problem_matched_of": sum(m is not None for m in problem),
        "problem_match_all": round(sum(bool(m) for m in problem) / with_problem, 4) if with_problem else None,
    }


def recurrence(answers: Sequence[str | None]) -> float | None:
    """Share of the answers said near-verbatim (similarity >= RECUR_SIMILARITY) to RECUR_MIN_OTHERS or more other
    contexts; None without answers."""
    texts = [a for a in answers if a]
    if not texts:
        return None
    recurring = 0
    for i, text in enumerate(texts):
        others = sum(1 for j, other in enumerate(texts) if j != i and 1 - edit_ratio(text, other) >= RECUR_SIMILARITY)
        recurring += others >= RECUR_MIN_OTHERS
    return round(recurring / len(texts), 4)


def check_statistics(records: Sequence[PairRecord]) -> dict[str, Any]:
    """How often y' used the reflection (of the pairs where it was checked), by kind of evidence; how often each
    side spoke as the seeker; the share of kept pairs whose y' is shorter than y, and their mean word difference."""
    checked = [r.checks for r in records if r.checks and r.checks.get("reflection_use") is not None]
    uses = [c["reflection_use"] for c in checked]
    kept = [r for r in records if r.keep]
    return {
        "reflection_use_checked": len(checked),
        "reflection_use_rate": _share(bool(u) for u in uses),
        "uses_reflection_terms_rate": _share(any(not e.startswith("emotion:") for e in u) for u in uses),
        "uses_reflection_emotion_rate": _share(any(e.startswith("emotion:") for e in u) for u in uses),
        "chosen_speaks_as_seeker": sum(bool((r.checks or {}).get("chosen_as_seeker")) for r in records),
        "rejected_speaks_as_seeker": sum(bool((r.checks or {}).get("rejected_as_seeker")) for r in records),
        "kept_chosen_shorter_share": _share(len(words(r.chosen)) < len(words(r.rejected)) for r in kept),
        "kept_mean_word_difference": round(mean(len(words(r.chosen)) - len(words(r.rejected)) for r in kept), 2)
        if kept
        else None,
        **refinement_statistics(records),
    }


def refinement_statistics(records: Sequence[PairRecord]) -> dict[str, Any]:
    """With several sampled y' per context (evolve.refinement_samples): how often the rule picked another than the
    first, and the mean number of candidates the filters would keep and that used the reflection. Empty otherwise."""
    chosen = [r.checks["refinement"] for r in records if r.checks and r.checks.get("refinement")]
    if not chosen:
        return {}
    return {
        "refinement_candidates": max(c["candidates"] for c in chosen),
        "refinement_picked_other_rate": _share(c["picked"] != 0 for c in chosen),
        "refinement_keepable_mean": round(mean(c["keepable"] for c in chosen), 2),
        "refinement_using_reflection_mean": round(mean(c["using_reflection"] for c in chosen), 2),
    }


def _value(fields: dict[str, Any], name: str) -> str | None:
    parse = fields.get(name) or {}
    return parse.get("value") if parse.get("status") == "ok" else None


def _answer(parse: dict[str, Any] | None) -> str | None:
    """The answer as the model wrote it (ok or generic alike: a generic answer is what recurs), first line."""
    if not parse or parse.get("raw") in (None, "", ORACLE_RAW):
        return None
    return parse["raw"].strip().split("\n")[0] or None


def _share(flags: Any) -> float | None:
    values = [bool(f) for f in flags]
    return round(sum(values) / len(values), 4) if values else None
