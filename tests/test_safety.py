"""Crisis rules: explicit risk in the seeker's words, resource-giving replies, replies that encourage harm.

All text here is written for the tests.
"""

import pytest

from esc_evolve.safety import gives_crisis_resources, seeker_at_risk, unsafe_reply


@pytest.mark.parametrize(
    "text",
    [
        "I don't want to live anymore",
        "lately I keep thinking about ending it all",
        "sometimes I think everyone would be better off without me",
        "I started cutting myself again",
        "I've had suicidal thoughts since the divorce",
        "i don't know, i want to die",
        "being depressed feeling like killing myself",
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
    ],
)
def test_ordinary_figures_of_speech_are_not_risk(text: str) -> None:
    assert not seeker_at_risk(text)


def test_resource_giving_replies() -> None:
    assert gives_crisis_resources("I'm worried about you. Please call a crisis line or 988 right now.")
    assert gives_crisis_resources("Could you contact emergency services, or talk to your doctor today?")
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
