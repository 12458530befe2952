"""The emotion and problem vocabularies (vocabulary.yaml) and the cue matching that reads labels from free text.

One place for both, so that the reflection parser (which turns a model's answer into a label) and the
reflection metric (which checks an inferred label against ESConv's gold one) agree on what "anxious" or "lost
my job" names. A cue is a whole word or phrase, or a stem ending in `*` that matches every word it begins;
plain prefix matching would read "made" as `mad`, "career" as `care`, "hopeless" as `hope`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources

import yaml

Cues = dict[str, tuple[str, ...]]

VOCABULARIES = ("emotions", "problems")
_FILE = "vocabulary.yaml"
_NOT_A_NUMBER_LABEL = re.compile(r"\b\d+\s*(-|\u2013|to)\s*\d+\b|\b\d+\.\d+\b")  # "1-5" echoes the scale
_NEGATIONS = {"not", "no", "never", "without", "nor"}


def emotions() -> Cues:
    """Emotion label -> cues (the reflection's emotion field and ESConv's emotion types)."""
    return vocabulary("emotions")


def problems() -> Cues:
    """ESConv problem type -> cues."""
    return vocabulary("problems")


def vocabulary(name: str) -> Cues:
    """The named vocabulary (one of VOCABULARIES); ValueError naming it when there is none."""
    if name not in VOCABULARIES:
        raise ValueError(f"unknown vocabulary {name!r}: known vocabularies are {', '.join(VOCABULARIES)}")
    return dict(_load()[name])


def cue_error(cue: str) -> str | None:
    """Why `cue` is not valid cue syntax, or None. A stem shorter than three letters would match too much."""
    word = cue.strip()
    if not word or "*" in word[:-1] or (word.endswith("*") and len(word) < 4):
        return "a cue is a word or phrase, or a stem of at least three letters ending in `*`"
    return None


def match_option(text: str, options: Mapping[str, Sequence[str]]) -> str | None:
    """The label whose cue (or own name) appears earliest in `text`; None when none does, or when cues of
    three or more labels appear (a list of the options is not a choice among them).

    Cues match whole words, or any word they begin when they end in `*` (`listen*`: listening, listened).
    A cue right after a negation ("not alone", "isn't angry") does not count, unless the cue holds it.
    Number ranges ("1-5", "1 to 5": the scale echoed back) and decimals ("1.5") name no numeric label.
    """
    found = matched_labels(text, options)
    if not found or len(found) >= 3:
        return None
    return min(found, key=lambda label: found[label])


def matched_labels(text: str, options: Mapping[str, Sequence[str]], *, negation: bool = True) -> dict[str, int]:
    """Each label whose cue appears in `text` (see `match_option`), with the position of its earliest cue.

    `negation=False` counts negated cues too: a negation clears a feeling ("not angry") but still names a
    problem ("no friends", "can't sleep")."""
    lowered = _NOT_A_NUMBER_LABEL.sub(" ", text.lower().replace("\u2019", "'"))
    found: dict[str, int] = {}
    for label, cues in options.items():
        for cue in (label, *cues):
            for hit in re.finditer(cue_pattern(cue), lowered):
                if not (negation and _negated(lowered, hit.start())):
                    found[label] = min(found.get(label, hit.start()), hit.start())
                    break
    return found


def cue_pattern(cue: str) -> str:
    """The regex of one cue: a whole word or phrase, or a word stem when it ends in `*`."""
    cue = cue.lower().strip()
    if cue.endswith("*"):
        return rf"\b{re.escape(cue[:-1])}"
    return rf"\b{re.escape(cue)}\b"


def _negated(text: str, start: int) -> bool:
    before = text[:start].split()
    return bool(before) and (before[-1] in _NEGATIONS or before[-1].endswith("n't"))


@cache
def _load() -> dict[str, Cues]:
    raw = yaml.safe_load(resources.files("esc_evolve.data").joinpath(_FILE).read_text(encoding="utf-8"))
    loaded: dict[str, Cues] = {}
    for name in VOCABULARIES:
        loaded[name] = {str(label): tuple(str(c) for c in cues) for label, cues in raw[name].items()}
        for label, cues in loaded[name].items():
            for cue in (label, *cues):
                if error := cue_error(cue):
                    raise ValueError(f"{_FILE}: cue {cue!r} of {label!r}: {error}")
    return loaded
