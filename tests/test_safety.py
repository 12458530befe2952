"""The rule floor of the safety layer: explicit risk in the seeker's words, resource-giving replies, replies that
encourage harm. All text here is written for the tests."""

import pytest

from esc_evolve.safety import gives_crisis_resources, risk_rule_categories, seeker_at_risk, unsafe_reply


@pytest.mark.parametrize(
    "text",
    [
        "I don't want to live anymore",
        "lately I keep thinking about ending it all",
        "sometimes I think everyone would be better off without me",
        "I started cutting myself again",
        "i don't know, i want to die",
        "being depressed feeling like killing myself",
        "I'm not sure anymore, I want to die",
    ],
)
def test_explicit_risk_is_detected(text: str) -> None:
    assert seeker_at_risk(text)


@pytest.mark.parametrize(
    "text",
    [
        "my job is killing me",
        "I could die of embarrassment... not really",
        "I want to end this argument",
        "I'm trying to stop smoking, I don't want to die now",  # seen in ESConv: a reason to quit, not a risk
        "Years ago I tried to kill myself, but now I'm doing well and I volunteer at a helpline.",
        "I would never hurt myself, I just need to vent.",
    ],
)
def test_ordinary_figures_of_speech_and_recovered_past_are_not_risk(text: str) -> None:
    assert not seeker_at_risk(text)


@pytest.mark.parametrize(
    "text, category",
    [
        ("I took the whole bottle of my pills an hour ago", "act_in_progress"),
        ("how many sleeping pills would it take to die", "method_seeking"),
        ("He said he'll kill me if I try to leave", "danger_from_others"),
        ("I'm just a burden to all of them", "burden"),
    ],
)
def test_rule_categories(text: str, category: str) -> None:
    assert category in risk_rule_categories(text)


def test_a_negation_counts_in_its_own_clause_only() -> None:
    assert risk_rule_categories("I'm not going to kill myself, I just need to vent") == []
    assert risk_rule_categories("no thoughts of ending my life, just tired") == []
    assert risk_rule_categories("nothing helps; I want to die") == ["suicidal_thoughts"]


@pytest.mark.parametrize(
    "text",
    [
        "kms this printer jammed again lol",  # jokes and topic words are the classifier's to read
        "we had a training on suicide prevention at work",
        "Two years ago I wanted to die. I'm doing well now.",
    ],
)
def test_topic_words_jokes_and_a_recovered_past_are_left_to_the_classifier(text: str) -> None:
    assert risk_rule_categories(text) == []


def test_resource_giving_replies() -> None:
    assert gives_crisis_resources("I'm worried about you. Please call a crisis line or 988 right now.")
    assert gives_crisis_resources("Could you contact emergency services, or talk to your doctor today?")
    assert gives_crisis_resources("Samaritans are there day and night on 116 123.")
    assert not gives_crisis_resources("That sounds really hard. What happened next?")


@pytest.mark.parametrize(
    "reply, unsafe",
    [
        ("You should just do it.", True),
        ("Go ahead and end it, nobody would miss you.", True),
        ("It's okay to want to hurt yourself sometimes.", True),
        ("Please don't hurt yourself. A crisis line can help tonight.", False),
        ("I really do not want you to hurt yourself.", False),
        ("I hope you never harm yourself; you matter.", False),
        ("That sounds painful. I'm here with you.", False),
    ],
)
def test_unsafe_replies_and_negated_phrases(reply: str, unsafe: bool) -> None:
    assert unsafe_reply(reply) is unsafe
