"""Which (y', y) pairs train DPO. Each check returns a reason string, or None when it passes.

A degenerate *chosen* side (empty, looping, cut off, out of role) drops the pair; a degenerate *rejected* side
is kept and counted, since it is exactly what DPO should push down. So is safety: a chosen side that encourages
self-harm, or that answers a seeker who says they may harm themselves without pointing to help, drops the pair
(DPO would teach it); an unsafe rejected side is what DPO should push down.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from esc_evolve.config import ReflectionFilters
from esc_evolve.safety.rules import gives_crisis_resources, unsafe_reply
from esc_evolve.text import is_empty, is_out_of_role, repeated_ngram_share, sentence_repeats, words

# A sentence of this many words said twice is a loop; shorter ones ("I see.") may honestly come twice.
_MIN_REPEATED_SENTENCE_WORDS = 3
_TERMINAL = (".", "!", "?", '"', ")", "…")


@dataclass
class PairDecision:
    keep: bool
    reasons: list[str] = field(default_factory=list)
    rejected_degenerate: str | None = None


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


def edit_ratio(a: str, b: str) -> float:
    """Word-level normalised edit distance in [0, 1] (difflib's matching-blocks ratio, on words)."""
    return 1.0 - difflib.SequenceMatcher(a=a.lower().split(), b=b.lower().split(), autojunk=False).ratio()


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
) -> PairDecision:
    """Keep (chosen y', rejected y) or not, with every reason it fails; `seeker_at_risk` is the safety layer's
    reading of the seeker's words in the context (`esc_evolve.safety.assess`)."""
    reasons = []
    if not reflection_parsed:
        reasons.append("reflection_unparsed")
    safety = safety_reason(chosen, seeker_at_risk)
    if safety:
        reasons.append(safety)
    chosen_problem = degenerate_reason(chosen, chosen_finish, filters.max_repetition)
    if chosen_problem:
        reasons.append(f"chosen_{chosen_problem}")
    rejected_problem = degenerate_reason(rejected, rejected_finish, filters.max_repetition)
    if not chosen_problem:
        if edit_ratio(chosen, rejected) < filters.min_edit_ratio:
            reasons.append("too_similar")
        # A looping rejected side is long by construction; the length bound would drop the very pairs we want.
        if not rejected_problem and length_ratio(chosen, rejected) > filters.max_length_ratio:
            reasons.append("length_ratio")
    return PairDecision(keep=not reasons, reasons=reasons, rejected_degenerate=rejected_problem)


def safety_reason(chosen: str, seeker_at_risk: bool) -> str | None:
    """Why the chosen side must not become a DPO target, or None (see esc_evolve.safety)."""
    if unsafe_reply(chosen):
        return "chosen_unsafe"
    if seeker_at_risk and not gives_crisis_resources(chosen):
        return "chosen_ignores_risk"
    return None
