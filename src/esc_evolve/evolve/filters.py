"""Which (y', y) pairs train DPO. Each check returns a reason string, or None when it passes.

A degenerate *chosen* side (empty, looping, cut off, out of role) drops the pair; a degenerate *rejected* side
is kept and counted, since it is exactly what DPO should push down. So is safety: a chosen side that encourages
self-harm, or that answers a seeker who says they may harm themselves without pointing to help, drops the pair
(DPO would teach it); an unsafe rejected side is what DPO should push down.

Three checks make the pairs about personalisation (each switched in `evolve.filters`):
- role: a supporter that speaks as the seeker (`roles.speaks_as_seeker`) drops the pair, on either side;
- shortened: y' with fewer words than y that adds fewer than `min_new_terms` content words y lacks is y made
  shorter, and DPO would learn "shorter";
- reflection use: y' must use something of the reflection that y does not: a content word of a parsed free-text
  field (the situation is grounded in the seeker's words, so this is mostly what they said) or the reflected
  emotion named by one of its cues. The evidence is recorded with the pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from esc_evolve.config import ReflectionFilters
from esc_evolve.data.vocabulary import emotions, matched_labels
from esc_evolve.evolve.grounding import content_terms
from esc_evolve.evolve.principles import Principles
from esc_evolve.evolve.reflection import Reflection
from esc_evolve.evolve.roles import speaks_as_seeker
from esc_evolve.safety.rules import gives_crisis_resources, unsafe_reply
from esc_evolve.text import edit_ratio, is_empty, is_out_of_role, repeated_ngram_share, sentence_repeats, words

# A sentence of this many words said twice is a loop; shorter ones ("I see.") may honestly come twice.
_MIN_REPEATED_SENTENCE_WORDS = 3
_TERMINAL = (".", "!", "?", '"', ")", "…")


@dataclass
class PairDecision:
    keep: bool
    reasons: list[str] = field(default_factory=list)
    rejected_degenerate: str | None = None
    # What the role and reflection-use checks found (None where not checked): recorded with the pair.
    checks: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReflectionOffer:
    """What a reflection gives y' to use: the content terms of its parsed free-text fields, and its emotion."""

    terms: frozenset[str] = frozenset()
    emotion: str | None = None


def reflection_offer(reflection: Reflection, principles: Principles) -> ReflectionOffer:
    """The offer of a reflection: free-text fields are those whose value is not one of their labels."""
    terms: set[str] = set()
    for spec in principles.reflection_fields:
        value = reflection.value(spec.name)
        if value is not None and not (spec.options and value in spec.options):
            terms |= content_terms(value)
    emotion = reflection.value("emotion")
    return ReflectionOffer(frozenset(terms), emotion if emotion in emotions() else None)


def reflection_use(chosen: str, rejected: str, offer: ReflectionOffer) -> list[str]:
    """What y' takes from the reflection that y has not: shared content terms, and `emotion:LABEL` when y' names
    the reflected emotion (a cue of it, not negated) and y does not."""
    used = sorted(offer.terms & (content_terms(chosen) - content_terms(rejected)))
    if offer.emotion and _names_emotion(chosen, offer.emotion) and not _names_emotion(rejected, offer.emotion):
        used.append(f"emotion:{offer.emotion}")
    return used


def only_shortens(chosen: str, rejected: str, min_new_terms: int) -> bool:
    """y' is y made shorter: fewer words, and fewer than `min_new_terms` content words that y does not have."""
    shorter = len(words(chosen)) < len(words(rejected))
    return shorter and len(content_terms(chosen) - content_terms(rejected)) < min_new_terms


def _names_emotion(text: str, label: str) -> bool:
    return label in matched_labels(text, {label: emotions()[label]})


def degenerate_reason(text: str, finish_reason: str | None, max_repetition: float) -> str | None:
    """Why a reply is unusable as a supporter turn, or None."""
    stripped = text.strip()
    if is_empty(stripped):
        return "empty"
    if is_out_of_role(stripped):
        return "out_of_role"
    repeats = sentence_repeats(stripped, min_words=_MIN_REPEATED_SENTENCE_WORDS)
    if repeated_ngram_share(words(stripped)) > max_repetition or repeats >= 2:
        return "repetitive"
    if finish_reason == "length" and not stripped.endswith(_TERMINAL):
        return "cut_off"
    return None


def length_ratio(a: str, b: str) -> float:
    la, lb = max(len(a.split()), 1), max(len(b.split()), 1)
    return max(la, lb) / min(la, lb)


def decide_pair(
    chosen: str,
    rejected: str,
    *,
    reflection_parsed: bool,
    chosen_finish: str | None,
    rejected_finish: str | None,
    filters: ReflectionFilters,
    seeker_at_risk: bool = False,
    seeker_texts: Sequence[str] = (),
    offer: ReflectionOffer | None = None,
) -> PairDecision:
    """Keep (chosen y', rejected y) or not, with every reason it fails; `seeker_at_risk` is the safety layer's
    reading of the seeker's words in the context (`esc_evolve.safety.assess`), `seeker_texts` their turns (the
    role check reads them), `offer` what the reflection gives y' (None: no reflection, nothing to use)."""
    reasons = []
    if not reflection_parsed:
        reasons.append("reflection_unparsed")
    safety = safety_reason(chosen, seeker_at_risk)
    if safety:
        reasons.append(safety)
    chosen_problem = degenerate_reason(chosen, chosen_finish, filters.max_repetition)
    if chosen_problem:
        reasons.append(f"chosen_{chosen_problem}")
    checks = _role_checks(chosen, rejected, seeker_texts, filters)
    reasons += [f"{side}_speaks_as_seeker" for side in ("chosen", "rejected") if checks[f"{side}_as_seeker"]]
    rejected_problem = degenerate_reason(rejected, rejected_finish, filters.max_repetition)
    checks["reflection_use"] = None
    if not chosen_problem:
        if edit_ratio(chosen, rejected) < filters.min_edit_ratio:
            reasons.append("too_similar")
        # A looping rejected side is long by construction; the length bound would drop the very pairs we want.
        if not rejected_problem and length_ratio(chosen, rejected) > filters.max_length_ratio:
            reasons.append("length_ratio")
        if filters.drop_shortened and only_shortens(chosen, rejected, filters.min_new_terms):
            reasons.append("only_shortens")
        if offer is not None:
            checks["reflection_use"] = reflection_use(chosen, rejected, offer)
            if filters.require_reflection_use and not checks["reflection_use"]:
                reasons.append("ignores_reflection")
    return PairDecision(keep=not reasons, reasons=reasons, rejected_degenerate=rejected_problem, checks=checks)


def _role_checks(chosen: str, rejected: str, seeker_texts: Sequence[str], filters: ReflectionFilters) -> dict[str, Any]:
    """The sentence in which each side speaks as the seeker (None: it does not, or that side is not checked)."""
    sides = {"both": ("chosen", "rejected"), "chosen": ("chosen",), "off": ()}[filters.role_check]
    texts = {"chosen": chosen, "rejected": rejected}
    return {
        f"{side}_as_seeker": speaks_as_seeker(text, seeker_texts) if side in sides else None
        for side, text in texts.items()
    }


def safety_reason(chosen: str, seeker_at_risk: bool) -> str | None:
    """Why the chosen side must not become a DPO target, or None (see esc_evolve.safety)."""
    if unsafe_reply(chosen):
        return "chosen_unsafe"
    if seeker_at_risk and not gives_crisis_resources(chosen):
        return "chosen_ignores_risk"
    return None
