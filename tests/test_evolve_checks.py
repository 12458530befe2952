"""Reflections a small model can get right, and pairs about personalisation: grounding, generic answers, exemplars,
self-consistency, the role / shortening / reflection-use filters and the statistics that report them. The texts are
written for the tests, after what M0 wrote on ESConv (docs/evolve.md)."""

from pathlib import Path

import numpy as np
import pytest

from esc_evolve.config import EvolveSettings, ExperimentConfig, ReflectionFilters
from esc_evolve.data.schema import Turn
from esc_evolve.evolve.exemplars import load_exemplars, probe_samples
from esc_evolve.evolve.filters import ReflectionOffer, decide_pair, only_shortens, reflection_offer, reflection_use
from esc_evolve.evolve.grounding import Grounder, content_terms, lexical_grounding
from esc_evolve.evolve.loop import generate_pairs, reflection_prompt
from esc_evolve.evolve.pairs import PairRecord, PairStore
from esc_evolve.evolve.principles import load_principles
from esc_evolve.evolve.quality import check_statistics, quality_of, recurrence
from esc_evolve.evolve.reflection import (
    FieldParse,
    ReflectionRules,
    aggregate,
    build_reflection,
    reflection_messages,
    reflection_summary,
)
from esc_evolve.evolve.roles import speaks_as_seeker
from esc_evolve.generation.types import GenerationResult
from tests.test_evolve_loop import NoRiskDetector, ScriptedGenerator, select_contexts, tokenizer

__all__ = ["tokenizer"]  # the loop tests' tokenizer fixture

PRINCIPLES = load_principles()
SEEKER = (
    "Not great. I'm in the middle of a divorce. 15 years. It was mutual but it's harder than I expected.",
    "The worst is the nights the kids are at her place. The apartment is so quiet.",
)
RAW = {
    "emotion": " sadness.",
    "intensity": " 3.",
    "situation": " a mutual divorce after 15 years and quiet nights when the kids are away.",
    "profile": " is reflective and honest.",
    "need": " reassurance.",
    "critique": " name the quiet apartment and the kids being at her place.",
}
GENERIC_CRITIQUE = "be more concise and to the point."


def rules(**kw) -> ReflectionRules:
    return ReflectionRules(seeker_texts=SEEKER, grounder=Grounder("lexical"), **kw)


# -- grounding ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "situation",
    [
        "a stressful situation.",
        "a difficult situation that is causing them to feel overwhelmed.",
        "a bad situation.",
        "feeling very sad and hurt right now.",  # an emotion restates how they feel, not what happened
    ],
)
def test_a_generic_situation_names_nothing_the_seeker_said(situation: str) -> None:
    assert not lexical_grounding(situation, SEEKER).grounded
    reflection = build_reflection(PRINCIPLES, {**RAW, "situation": f" {situation}"}, rules=rules())
    assert reflection.fields["situation"].status == "generic" and reflection.value("situation") is None
    assert not reflection.parsed  # a generic situation counts as unparsed


def test_a_grounded_situation_names_the_seekers_own_words() -> None:
    grounding = lexical_grounding("a divorce after fifteen years, and the kids are away some nights", SEEKER)
    assert grounding.grounded and {"divorc", "kid", "night"} <= set(grounding.terms)
    reflection = build_reflection(PRINCIPLES, RAW, rules=rules())
    assert reflection.parsed and reflection.fields["situation"].evidence  # the terms it shares with the seeker
    assert not lexical_grounding("a divorce", SEEKER, min_terms=2).grounded


def test_content_terms_drop_stopwords_generic_words_and_emotions_and_meet_across_inflections() -> None:
    assert content_terms("I'm so anxious, it's a really difficult situation for me") == set()
    assert content_terms("divorced") == content_terms("a divorce") == {"divorc"}
    assert content_terms("lost my jobs after 11 years") == {"lost", "job", "11", "year"}


class FakeEmbedder:
    """Unit vectors by keyword: texts about the divorce or the kids point one way, everything else the other."""

    key = "fake"

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.array([[1.0, 0.0] if "divorce" in t or "kids" in t else [0.0, 1.0] for t in texts])


def test_embedding_grounding_reads_the_closest_seeker_turn() -> None:
    grounder = Grounder("embedding", min_similarity=0.5, embedder=FakeEmbedder())
    close = grounder.check("their divorce", SEEKER)
    assert close.grounded and close.similarity == 1.0
    assert not grounder.check("a stressful time", SEEKER).grounded


# -- generic critiques and copied exemplars -------------------------------------------------------------------


def test_a_critique_said_to_unrelated_conversations_is_generic_and_carries_no_weight() -> None:
    probes = {"critique": ["be more concise and to the point.", "ask them a question."]}
    generic = build_reflection(PRINCIPLES, {**RAW, "critique": f" {GENERIC_CRITIQUE}"}, rules=rules(probes=probes))
    critique = generic.fields["critique"]
    assert critique.status == "generic" and critique.evidence == ("be more concise and to the point.",)
    assert generic.parsed  # not required once generic ...
    assert "concise" not in reflection_summary(generic, PRINCIPLES)  # ... and not shown to the refinement
    specific = build_reflection(PRINCIPLES, RAW, rules=rules(probes=probes))
    assert specific.fields["critique"].status == "ok" and "quiet apartment" in reflection_summary(specific, PRINCIPLES)
    without_rules = build_reflection(PRINCIPLES, {**RAW, "critique": f" {GENERIC_CRITIQUE}"})
    assert without_rules.fields["critique"].status == "ok"  # serving's profile memory reads answers as before


def test_an_answer_copied_from_an_exemplar_is_generic() -> None:
    copied = " a close friend who borrowed $1,500 for his car and now goes quiet."
    shown = {"situation": [" a close friend who borrowed $1,500 for his car and now goes quiet whenever asked."]}
    seeker = ("My friend never calls me back.",)  # shares "friend" with the copy by chance
    reflection = build_reflection(
        PRINCIPLES,
        {**RAW, "situation": copied},
        rules=ReflectionRules(seeker_texts=seeker, grounder=Grounder("lexical"), shown=shown),
    )
    assert reflection.fields["situation"].status == "generic" and not reflection.parsed


# -- self-consistency -----------------------------------------------------------------------------------------


def _field(name: str):
    found = PRINCIPLES.field(name)
    assert found is not None
    return found


def test_labelled_fields_take_the_label_most_samples_name() -> None:
    agreed = build_reflection(PRINCIPLES, {**RAW, "emotion": [" sad.", " anxious.", " heartbroken."]})
    emotion = agreed.fields["emotion"]
    assert emotion.value == "sadness" and emotion.agreement == 0.6667 and len(emotion.samples) == 3
    split = build_reflection(PRINCIPLES, {**RAW, "emotion": [" sad.", " anxious.", " angry."]})
    assert split.fields["emotion"].status == "no_agreement" and not split.parsed
    broken = build_reflection(PRINCIPLES, {**RAW, "emotion": [" sad.", " user: user:", " ???"]})
    assert broken.fields["emotion"].status == "no_agreement"  # one vote of three is not a majority


def test_free_text_fields_take_the_answer_that_agrees_most_with_the_others() -> None:
    answers = [
        " a divorce after 15 years with the kids away at night.",
        " their new puppy.",
        " a divorce after 15 years that is harder than expected.",
    ]
    situation = build_reflection(PRINCIPLES, {**RAW, "situation": answers}, rules=rules()).fields["situation"]
    assert situation.status == "ok" and situation.value.startswith("a divorce after 15 years")
    assert 0 < situation.agreement < 1
    # The ungrounded sample never wins: it is generic before the vote.
    generic_first = [" a stressful situation.", answers[0], answers[2]]
    picked = build_reflection(PRINCIPLES, {**RAW, "situation": generic_first}, rules=rules()).fields["situation"]
    assert picked.status == "ok" and "divorce" in picked.value
    demanding = ReflectionRules(seeker_texts=SEEKER, grounder=Grounder("lexical"), min_text_agreement=0.9)
    assert build_reflection(PRINCIPLES, {**RAW, "situation": answers}, rules=demanding).fields["situation"].status == (
        "no_agreement"
    )


def test_a_field_whose_samples_all_fail_reports_the_most_common_failure() -> None:
    parses = [FieldParse("emotion", "x", None, "no_label"), FieldParse("emotion", "y", None, "degenerate")] * 2
    out = aggregate(_field("emotion"), parses[:3], 0.5, 0.0)
    assert out.status == "no_label" and out.agreement == 0.0 and out.samples == ("x", "y", "x")


# -- exemplars and probes ---------------------------------------------------------------------------------------


def test_exemplars_come_from_builtin_training_conversations_and_answer_every_field() -> None:
    from esc_evolve.data import load_conversations
    from esc_evolve.evolve.reflection import parse_field

    exemplars = load_exemplars(3)
    valid = {c.id for c in load_conversations("builtin:valid").conversations}
    assert exemplars and not {e.conversation_id for e in exemplars} & valid
    assert len({e.answers["emotion"] for e in exemplars}) == 3  # different labels: a choice, not one to copy
    for exemplar in exemplars:
        assert exemplar.context[0].speaker == "seeker"
        for spec in PRINCIPLES.reflection_fields:  # each answer parses as the field it shows, and is grounded
            parsed = parse_field(spec, exemplar.answers[spec.name])
            assert parsed.status == "ok", (spec.name, exemplar.answers[spec.name])
        said = [t.text for t in exemplar.context if t.speaker == "seeker"]
        assert lexical_grounding(exemplar.answers["situation"], said).grounded
    probes = probe_samples(4, [e.conversation_id for e in exemplars])
    assert len({p.conversation_id for p in probes}) == 4
    assert not {p.conversation_id for p in probes} & ({e.conversation_id for e in exemplars} | valid)


def test_exemplars_are_earlier_turns_of_the_question() -> None:
    exemplars = load_exemplars(2)
    situation = _field("situation")
    context = [Turn(speaker="seeker", text="My landlord wants me out by Friday.")]
    messages = reflection_messages(situation, context, PRINCIPLES, "A draft.", exemplars)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[2]["content"] == situation.prefix + exemplars[0].answers["situation"]
    assert "landlord" in messages[-1]["content"] and "landlord" not in messages[1]["content"]
    # the critique exemplar shows the draft it criticises
    critique = reflection_messages(_field("critique"), context, PRINCIPLES, "A draft.", exemplars)
    assert exemplars[0].draft in critique[1]["content"]


def test_a_tight_budget_drops_old_turns_first_then_exemplars(tokenizer) -> None:
    from esc_evolve.data.prompts import encode_prompt

    exemplars = load_exemplars(2)
    situation = _field("situation")
    context = [Turn(speaker="seeker", text=t) for t in ("First thing.", "Second thing.", "Third thing.")]

    def size(messages):
        return len(encode_prompt(tokenizer, messages, continuation=situation.prefix))

    full = reflection_prompt(tokenizer, situation, context, PRINCIPLES, "", None, exemplars)
    one_turn = reflection_prompt(tokenizer, situation, context[-1:], PRINCIPLES, "", None, exemplars)
    fitted = reflection_prompt(tokenizer, situation, context, PRINCIPLES, "", size(one_turn), exemplars)
    assert fitted == one_turn and size(full) > size(one_turn)
    fewer = reflection_prompt(tokenizer, situation, context, PRINCIPLES, "", size(one_turn) - 1, exemplars)
    assert len(fewer) == len(one_turn) - 2 and "Third thing." in fewer[-1]["content"]


# -- pair filters ---------------------------------------------------------------------------------------------

# Every pair check on (the defaults keep the two that cost most pairs off: docs/evolve.md, "Measured").
FILTERS_ON = {"role_check": "both", "drop_shortened": True, "require_reflection_use": True}
GOOD = "Ending 15 years together hurts even when it is mutual. What are those quiet nights like for you?"


def _decide(chosen: str, rejected: str, offer: ReflectionOffer | None = None, **filters):
    return decide_pair(
        chosen,
        rejected,
        reflection_parsed=True,
        chosen_finish="stop",
        rejected_finish="stop",
        filters=ReflectionFilters(**{**FILTERS_ON, **filters}),
        seeker_texts=SEEKER,
        offer=offer,
    )


@pytest.mark.parametrize(
    "as_seeker",
    [
        "I'm feeling a bit down, and I'm not sure if I should be talking to you right now.",
        "I feel so lonely these days. What should I do?",
        "Thank you for listening. I don't know what to do.",
        "The apartment is so quiet at night when my kids are at her place.",  # the seeker's own words, first person
    ],
)
def test_a_supporter_who_speaks_as_the_seeker_is_dropped_on_either_side(as_seeker: str) -> None:
    assert speaks_as_seeker(as_seeker, SEEKER)
    chosen = _decide(as_seeker, "I'm sorry to hear that.")
    assert not chosen.keep and "chosen_speaks_as_seeker" in chosen.reasons and chosen.checks["chosen_as_seeker"]
    rejected = _decide(GOOD, as_seeker)
    assert not rejected.keep and rejected.reasons == ["rejected_speaks_as_seeker"]
    assert _decide(GOOD, as_seeker, role_check="chosen").keep
    off = _decide(as_seeker, GOOD, role_check="off")
    assert not any("speaks_as_seeker" in r for r in off.reasons) and off.checks["chosen_as_seeker"] is None


@pytest.mark.parametrize(
    "supporter",
    [
        "I'm so sorry to hear that. It sounds like you're feeling really down.",
        "I'm worried about you. Are the quiet nights the hardest part?",
        "I felt the same way when my own marriage ended.",  # self-disclosure, in the past
        "I'm afraid I can't fix it, but I'm here. Your apartment sounds so quiet when the kids are at her place.",
        "What can I do to help you tonight?",
    ],
)
def test_a_supporter_in_role_passes_the_role_check(supporter: str) -> None:
    assert speaks_as_seeker(supporter, SEEKER) is None


def test_a_refinement_that_only_shortens_the_draft_is_dropped() -> None:
    draft = "I'm sorry about the divorce. That must be hard. How are you coping with the divorce?"
    shortened = "How are you coping with the divorce?"
    assert only_shortens(shortened, draft, min_new_terms=2)
    assert _decide(shortened, draft).reasons == ["only_shortens"]
    assert _decide(shortened, draft, drop_shortened=False).keep
    shorter_but_new = "A divorce after 15 years with the kids away: the nights must be so quiet."
    assert not only_shortens(shorter_but_new, draft, 2) and _decide(shorter_but_new, draft).keep
    assert not only_shortens(draft, shortened, 2)  # a longer y' never "only shortens"


def test_a_pair_is_kept_only_when_y_prime_uses_the_reflection_and_y_does_not() -> None:
    reflection = build_reflection(PRINCIPLES, RAW, rules=rules())
    offer = reflection_offer(reflection, PRINCIPLES)
    assert {"divorc", "kid", "night", "quiet"} <= offer.terms and offer.emotion == "sadness"
    generic = "That sounds really hard. I'm here for you, tell me more."
    kept = _decide(GOOD, generic, offer)
    assert kept.keep and {"night", "quiet", "year"} <= set(kept.checks["reflection_use"])
    ignored = _decide("It sounds hard. What has been on your mind this week, and who do you talk to?", generic, offer)
    assert ignored.reasons == ["ignores_reflection"] and ignored.checks["reflection_use"] == []
    said_already = _decide(GOOD, "Your mutual divorce after 15 years and the quiet nights.", offer)
    assert [e for e in said_already.checks["reflection_use"] if not e.startswith("emotion:")] == []  # y had them
    assert reflection_use("That is so sad.", "Tell me more about it.", offer) == ["emotion:sadness"]
    assert reflection_use("You're not sad.", "Tell me more.", ReflectionOffer(emotion="sadness")) == []
    unused = "It sounds hard. What has been on your mind this week, and who do you talk to?"
    assert _decide(unused, generic, offer, require_reflection_use=False).keep
    assert _decide(GOOD, generic, None).checks["reflection_use"] is None  # no reflection: nothing to use


# -- statistics -------------------------------------------------------------------------------------------------


def _record(sample_id: str, reflection: dict, gold: dict, keep: bool = True, checks: dict | None = None) -> PairRecord:
    return PairRecord(
        sample_id=sample_id,
        iteration=1,
        principles_version=5,
        prompt=[{"role": "user", "content": "U"}],
        rejected="one two three four",
        rejected_finish="stop",
        reflection=reflection,
        refine_system="R",
        chosen="one two",
        chosen_finish="stop",
        keep=keep,
        reasons=[] if keep else ["ignores_reflection"],
        rejected_degenerate=None,
        gold=gold,
        checks=checks,
    )


def test_reflection_quality_reports_gold_matches_and_generic_answers() -> None:
    fine = build_reflection(PRINCIPLES, RAW, rules=rules()).to_dict()
    generic = build_reflection(PRINCIPLES, {**RAW, "situation": " a hard time."}, rules=rules()).to_dict()
    gold = {"emotion_type": "sadness", "problem_type": "breakup with partner"}
    stats = quality_of([fine, generic, fine], [gold, gold, {**gold, "emotion_type": "anxiety"}])
    assert stats["emotion_match"] == 0.6667 and stats["emotion_matched_of"] == 3
    assert stats["problem_match"] == 1.0 and stats["problem_matched_of"] == 2  # the generic one has no situation
    assert stats["problem_match_all"] == 0.6667
    assert stats["generic_rate"]["situation"] == 0.3333 and stats["parse_rate"] == 0.6667


def test_recurrence_finds_the_critique_said_to_every_context() -> None:
    same = [GENERIC_CRITIQUE] * 4 + ["name the quiet apartment.", "ask about the kids' schedule."]
    assert recurrence(same) == 0.6667 and recurrence([]) is None


def test_check_statistics_count_reflection_use_and_role_errors() -> None:
    records = [
        _record(
            "a", {}, {}, checks={"reflection_use": ["divorc"], "chosen_as_seeker": None, "rejected_as_seeker": None}
        ),
        _record("b", {}, {}, False, {"reflection_use": [], "chosen_as_seeker": None, "rejected_as_seeker": "i'm sad."}),
        _record("c", {}, {}, checks={"reflection_use": None, "chosen_as_seeker": None, "rejected_as_seeker": None}),
        _record("d", {}, {}),  # an older record without checks
    ]
    stats = check_statistics(records)
    assert stats["reflection_use_checked"] == 2 and stats["reflection_use_rate"] == 0.5
    assert stats["rejected_speaks_as_seeker"] == 1 and stats["chosen_speaks_as_seeker"] == 0
    assert stats["kept_chosen_shorter_share"] == 1.0 and stats["kept_mean_word_difference"] == -2


# -- the loop -----------------------------------------------------------------------------------------------


class SamplingGenerator(ScriptedGenerator):
    """The loop tests' scripted model, with k sampled emotions: the second of three disagrees."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = []

    def _answer(self, request):
        self.requests.append(request)
        if request.continuation and request.id.endswith(":emotion") and "~1:" in request.id:
            return GenerationResult(" angry.", 3, "stop_string", request.id)
        return super()._answer(request)


def test_self_consistency_samples_k_answers_reproducibly_and_votes(tmp_path: Path, tokenizer) -> None:
    config = ExperimentConfig.model_validate(
        {
            "run": {"output_dir": str(tmp_path)},
            "evolve": {
                "contexts_per_iteration": 3,
                "reflection_samples": 3,
                "reflection_exemplars": 2,
                "situation_grounding": "lexical",
                "generic_probes": 4,
            },
        }
    )
    generator = SamplingGenerator()
    store = PairStore(tmp_path / "pairs.jsonl")
    summary = generate_pairs(
        config.evolve,
        select_contexts(config, 1),
        generator,
        store.path,
        iteration=1,
        seed=7,
        system_prompt=None,
        tokenizer=tokenizer,
        risk_detector=NoRiskDetector(),
    )
    answers = [r for r in generator.requests if r.continuation and not str(r.id).startswith("probe:")]
    assert len(answers) == 3 * 3 * len(PRINCIPLES.reflection_fields)
    assert {r.temperature for r in answers} == {0.7} and len({r.seed for r in answers}) == len(answers)
    probes = [r for r in generator.requests if r.continuation and str(r.id).startswith("probe:")]
    assert probes and {r.temperature for r in probes} == {0.0}  # probes answer once, greedy
    emotion = [r for r in answers if r.id.endswith(":emotion")]
    situation = [r for r in answers if r.id.endswith(":situation")]
    assert all(len(r.messages) == 2 for r in emotion)  # no exemplars for a labelled field (exemplars_for_labels)
    assert all(len(r.messages) == 6 for r in situation)  # two exemplars, then the question
    for record in store.read():
        assert record.reflection["fields"]["emotion"]["value"] == "anxiety"  # two of three votes
        assert record.reflection["fields"]["emotion"]["agreement"] == 0.6667
    assert summary["reflection_quality"]["agreement"]["emotion"] == 0.6667


def test_the_loops_checks_have_switches(tmp_path: Path, tokenizer) -> None:
    """With every new check off, the iteration makes the pairs it made before them."""
    off = {
        "reflection_exemplars": 0,
        "situation_grounding": "off",
        "generic_probes": 0,
        "filters": {"role_check": "off", "drop_shortened": False, "require_reflection_use": False},
    }
    config = ExperimentConfig.model_validate(
        {"run": {"output_dir": str(tmp_path)}, "evolve": {"contexts_per_iteration": 6, **off}}
    )
    assert EvolveSettings().reflection_samples == 1  # k = 1 by default: one greedy answer, as before
    generator = ScriptedGenerator()
    summary = generate_pairs(
        config.evolve,
        select_contexts(config, 1),
        generator,
        tmp_path / "pairs.jsonl",
        iteration=1,
        seed=42,
        system_prompt=None,
        tokenizer=tokenizer,
        risk_detector=NoRiskDetector(),
    )
    assert summary["kept"] == 6 and summary["reflection_parse_rate"] == 1.0  # "hey" contexts parse again
    assert generator.calls == 3  # draft, reflection, refinement: no probes
    records = list(PairStore(tmp_path / "pairs.jsonl").read())
    assert all(r.reflection["fields"]["critique"]["status"] == "ok" for r in records)  # no probe to repeat
