"""Role consistency: a supporter's reply must never speak as the seeker.

A small model trained on dialogues sometimes answers with the seeker's part: "I'm feeling a bit down, and I'm not
sure if I should be talking to you right now." Such a reply is in the supporter's slot, so the transcript checks
of `text.is_out_of_role` (role markers, talk about "the seeker") do not see it. Three signs, each read sentence by
sentence:

- the speaker's own present distress: "I'm (so / feeling / a bit) <emotion word>", "I feel <emotion word>",
  "I've been feeling <emotion word>", unless it is about the person ("I'm worried about you", "sad to hear");
- asking for help as a seeker does: "what should I do", "can you help me", "I don't know what to do",
  "thanks for listening", "I'm not sure if I should be talking to you";
- the seeker's own first-person words said back as the speaker's ("My girlfriend broke up with me last
  semester"): a sentence in the first person, with no "you" in it, most of whose content words one seeker turn
  already said.

A supporter's self-disclosure in the past ("I felt the same when I lost my job") is none of these.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from esc_evolve.evolve.grounding import content_terms, is_emotion_word
from esc_evolve.text import normalize_text, words

_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n+")
# "I'm", "I am", "I feel", "I've been (feeling)", with softeners in between ("I'm feeling a bit ...").
_FIRST_PERSON_STATE = re.compile(
    r"\bi(?:'m| am| feel| have been(?: feeling)?|'ve been(?: feeling)?)"
    r"((?:\s+(?:so|really|very|a bit|a little|kind of|kinda|pretty|quite|just|feeling|still|always|super|too|"
    r"extremely|incredibly|totally|completely|a lot more|more|less|getting|becoming|growing))*)\s+(\w+)"
)
# After the emotion word: it is about the person, not the speaker ("worried about you", "sad to hear that").
_ABOUT_THE_PERSON = re.compile(r"^\s*(?:for you|about you|with you|that you|when you|you|to hear|hearing|for them)\b")
# "I'm afraid that ..." / "I'm afraid I ..." is politeness, not fear.
_POLITE_AFRAID = re.compile(r"^\s*(?:i|it|that|this|there|we|so|not)\b")
_SEEKING_HELP = re.compile(
    r"\bwhat (?:should|do|can|could) i do\b(?! to help| for you)"
    r"|\b(?:can|could|would) you (?:please )?(?:help|advise) me\b"
    r"|\bi (?:just )?need (?:some )?(?:help|advice)\b"
    r"|\bi (?:don't|do not) know what to do\b"
    r"|\bi (?:just )?need (?:someone|somebody|to talk|to vent)\b"
    r"|\bthank(?:s| you)(?: so much)? for (?:listening|the advice|your advice|your help|helping me|hearing me out)\b"
    r"|\bi(?:'m| am) not sure (?:if|whether) i should\b"
)
_FIRST_PERSON = {"i", "i'm", "i've", "i'd", "i'll", "my", "me", "myself", "mine"}
_SECOND_PERSON = {"you", "your", "you're", "you've", "you'd", "you'll", "yours", "yourself"}
_ECHO_SHARE = 0.6  # share of the sentence's content terms that one seeker turn already said
_ECHO_MIN_TERMS = 3


def speaks_as_seeker(reply: str, seeker_texts: Sequence[str] = ()) -> str | None:
    """The first sentence of `reply` in which the supporter speaks as the seeker, or None."""
    said = [content_terms(t) for t in seeker_texts]
    for sentence in _SENTENCES.split(normalize_text(reply)):
        if _own_distress(sentence) or _SEEKING_HELP.search(sentence) or _echoes_seeker(sentence, said):
            return sentence.strip()
    return None


def _own_distress(sentence: str) -> bool:
    for match in _FIRST_PERSON_STATE.finditer(sentence):
        word, after = match.group(2), sentence[match.end() :]
        if not is_emotion_word(word) or _ABOUT_THE_PERSON.match(after):
            continue
        if word == "afraid" and _POLITE_AFRAID.match(after):
            continue
        return True
    return False


def _echoes_seeker(sentence: str, said: list[set[str]]) -> bool:
    found = set(words(sentence))
    if not found & _FIRST_PERSON or found & _SECOND_PERSON:
        return False
    terms = content_terms(sentence)
    if len(terms) < _ECHO_MIN_TERMS:
        return False
    return any(len(terms & turn) / len(terms) >= _ECHO_SHARE for turn in said)
