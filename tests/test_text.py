"""The shared text checks (esc_evolve.text): tokenisation, emptiness, loops, role markers, out-of-role talk."""

from __future__ import annotations

import pytest

from esc_evolve.text import (
    ends_in_a_loop,
    has_role_marker,
    is_empty,
    is_out_of_role,
    low_word_variety,
    ngrams,
    normalize_text,
    repeated_ngram_share,
    sentence_repeats,
    words,
)

SORRY_LOOP = "I'm so sorry to hear that. " * 6


def test_normalisation_and_words() -> None:
    assert normalize_text("I\u2019M \ufb01ne") == "i'm fine"  # curly quote straightened, NFKC ligature split
    assert words("Don't   stop-now!") == ["don't", "stop", "now"]
    assert ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert ngrams(["a"], 2) == []


@pytest.mark.parametrize(("text", "empty"), [("", True), ("  ... !? ", True), ("\n\t", True), ("ok", False)])
def test_is_empty(text: str, empty: bool) -> None:
    assert is_empty(text) is empty


def test_repeated_ngram_share_separates_loops_from_prose() -> None:
    assert repeated_ngram_share(words("a b c a b c a b c")) > 0.5  # one phrase looped
    assert repeated_ngram_share(words("a b c d e f")) == 0.0
    assert repeated_ngram_share(words(SORRY_LOOP)) > 0.5
    assert repeated_ngram_share(words("Losing a job after ten years is a real shock. What hit you hardest?")) == 0.0
    assert repeated_ngram_share(["a", "b"]) == 0.0  # too short for one 3-gram


def test_sentence_repeats_counts_the_most_frequent_sentence() -> None:
    assert sentence_repeats(SORRY_LOOP) == 6
    assert sentence_repeats("I hear you. That is hard! i hear YOU?") == 2  # case and punctuation ignored
    assert sentence_repeats("What happened? Did you talk to your manager?") == 1
    assert sentence_repeats("Okay. Okay. Tell me more.") == 2
    assert sentence_repeats("Okay. Okay. Tell me more.", min_words=3) == 1  # short sentences may come twice
    assert sentence_repeats("...") == 0


def test_low_word_variety() -> None:
    assert low_word_variety("sad sad sad sad sad sad sad sad")
    assert low_word_variety("to be happy and to be happy and to be happy.")
    assert not low_word_variety("sad sad sad")  # under six words: too short to call a loop
    assert not low_word_variety("is a bit of a loner, but they're also a bit of a supportive and caring person.")


def test_ends_in_a_loop() -> None:
    assert ends_in_a_loop("is a bit of a perfectionist, who is also a bit of a perfectionist.")
    assert ends_in_a_loop("to get a little advice, to get a little")
    assert not ends_in_a_loop("focus on the person's emotional state and intensity, rather than the person's words.")
    assert not ends_in_a_loop("a b c d a b c")  # fewer than twice the tail: not enough text to call a loop


@pytest.mark.parametrize(
    ("text", "marked"),
    [
        ("<|im_start|>user\nI am sad", True),
        ("sad <|im_end|>", True),
        ("a breakup.\nPerson: thanks", True),
        ("Seeker: I lost my job", True),
        ("  supporter : hello", True),
        ("ASSISTANT: sure", True),
        ("I told the user: relax", False),  # a label only counts at a line start
        ("The person is dealing with a breakup.", False),
    ],
)
def test_role_markers(text: str, marked: bool) -> None:
    assert has_role_marker(text) is marked


@pytest.mark.parametrize(
    ("text", "out"),
    [
        ("User: hi there", True),
        ("This story is full of relatable emotions.", True),
        ("The seeker feels lost after the layoff.", True),
        ("As an AI, I cannot feel sad.", True),
        ("In this dialogue the supporter listens.", True),
        ("That sounds hard. What happened at work today?", False),
        ("Your story matters to me, and I'm listening.", False),  # talks to the person, not about the dialogue
    ],
)
def test_out_of_role(text: str, out: bool) -> None:
    assert is_out_of_role(text) is out
