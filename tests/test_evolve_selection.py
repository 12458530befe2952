"""The judge-free rule that picks one of several sampled refinements (evolve/selection.py)."""

from esc_evolve.evolve.filters import PairDecision
from esc_evolve.evolve.selection import pick_refinement, selection_record

DRAFT = "I am sorry to hear that. How are you feeling?"  # 9 words


def decision(keep: bool = True, uses: tuple[str, ...] = ()) -> PairDecision:
    return PairDecision(keep=keep, reasons=[] if keep else ["chosen_repetitive"], checks={"reflection_use": list(uses)})


def test_a_kept_candidate_beats_a_dropped_one_that_uses_more() -> None:
    candidates = ["loop loop loop", "That sounds hard."]
    assert pick_refinement(candidates, DRAFT, [decision(False, ("job", "boss")), decision(True)]) == 1


def test_more_use_of_the_reflection_wins_whatever_the_length() -> None:
    short_specific = "Losing the job sounds hard."
    long_generic = "I am so sorry to hear that, it sounds like a really hard time for you."
    decisions = [decision(uses=()), decision(uses=("job",))]
    assert pick_refinement([long_generic, short_specific], DRAFT, decisions) == 1


def test_at_equal_use_the_length_closest_to_the_draft_wins_then_the_first() -> None:
    much_shorter = "Hard."
    same_length = "That sounds so hard for you. What happened next?"  # 9 words
    longer = "That sounds so hard for you. What happened next after all of that?"
    decisions = [decision(uses=("hard",))] * 3
    assert pick_refinement([much_shorter, longer, same_length], DRAFT, decisions) == 2
    assert pick_refinement([same_length, same_length], DRAFT, decisions[:2]) == 0


def test_the_record_counts_the_candidates() -> None:
    decisions = [decision(False), decision(uses=("job",)), decision()]
    assert selection_record(1, decisions) == {"candidates": 3, "picked": 1, "keepable": 2, "using_reflection": 1}


def test_among_dropped_candidates_the_one_with_fewer_problems_wins() -> None:
    unparsed_only = PairDecision(keep=False, reasons=["reflection_unparsed"], checks={})
    unparsed_and_looping = PairDecision(keep=False, reasons=["reflection_unparsed", "chosen_repetitive"], checks={})
    assert pick_refinement(["loop loop", "That sounds hard."], DRAFT, [unparsed_and_looping, unparsed_only]) == 1
