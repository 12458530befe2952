"""Which of n sampled refinements y' becomes the chosen side (`evolve.refinement_samples`).

A judge-free rule, in order:
1. a candidate whose pair the filters keep beats one they drop (a degenerate, unsafe or out-of-role y' loses),
   and among dropped ones, one whose own text is usable (no `chosen_*` reason: degenerate, unsafe, ignoring a
   seeker at risk, speaking as the seeker), then one with fewer reasons (so the record shows the most useful y');
2. then the one that uses more of the reflection that y lacks (`filters.reflection_use`: content words of the
   reflection's free-text fields and the reflected emotion), the change the method wants y' to make;
3. then the one whose length is closest to y's, so that the choice never favours "shorter" or "longer" by itself
   (a gain that length explains is not a gain);
4. then the first sampled.
Nothing here reads the gold profile or an evaluation measure: the reflection is M_t's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from esc_evolve.evolve.filters import PairDecision
from esc_evolve.text import words


def selection_key(index: int, chosen: str, rejected: str, decision: PairDecision) -> tuple[int, ...]:
    """Sort key of one candidate: the smallest key is picked."""
    own_problems = sum(reason.startswith("chosen_") for reason in decision.reasons)
    uses = len(decision.checks.get("reflection_use") or [])
    length_gap = abs(len(words(chosen)) - len(words(rejected)))
    return (0 if decision.keep else 1, own_problems, len(decision.reasons), -uses, length_gap, index)


def pick_refinement(candidates: Sequence[str], rejected: str, decisions: Sequence[PairDecision]) -> int:
    """The index of the candidate the rule picks."""
    keys = [selection_key(i, c, rejected, d) for i, (c, d) in enumerate(zip(candidates, decisions, strict=True))]
    return min(range(len(keys)), key=keys.__getitem__)


def selection_record(picked: int, decisions: Sequence[PairDecision]) -> dict[str, Any]:
    """What the pair records of the choice (only when there was one): how many candidates, which was picked, how
    many the filters would have kept, and how many used the reflection."""
    return {
        "candidates": len(decisions),
        "picked": picked,
        "keepable": sum(d.keep for d in decisions),
        "using_reflection": sum(bool(d.checks.get("reflection_use")) for d in decisions),
    }
