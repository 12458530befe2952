"""The shared emotion/problem vocabulary (esc_evolve.data.vocabulary): loading, principles, metric matching."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from esc_evolve.data.vocabulary import (
    VOCABULARIES,
    cue_error,
    cue_pattern,
    emotions,
    match_option,
    matched_labels,
    problems,
    vocabulary,
)
from esc_evolve.errors import ConfigError
from esc_evolve.evaluation.matching import label_matches
from esc_evolve.evolve.principles import load_principles

ESCONV_EMOTIONS = {
    "anxiety",
    "depression",
    "sadness",
    "anger",
    "fear",
    "shame",
    "disgust",
    "nervousness",
    "guilt",
    "jealousy",
    "pain",
}
ESCONV_PROBLEMS = {
    "ongoing depression",
    "job crisis",
    "breakup with partner",
    "problems with friends",
    "academic pressure",
    "sleep problems",
    "issues with parents",
    "issues with children",
    "appearance anxiety",
    "alcohol abuse",
    "procrastination",
    "school bullying",
}


def test_vocabularies_load_and_cover_the_esconv_labels() -> None:
    assert set(emotions()) >= ESCONV_EMOTIONS
    assert {"loneliness", "stress", "frustration", "hopelessness"} <= set(emotions())
    assert emotions()["pain"] == ("pain", "painful")
    assert set(problems()) == ESCONV_PROBLEMS
    for name in VOCABULARIES:
        for label, cues in vocabulary(name).items():
            assert cues, label
            assert all(cue_error(cue) is None for cue in (label, *cues)), label


def test_vocabulary_is_not_mutated_through_a_caller() -> None:
    emotions().clear()
    assert "anxiety" in emotions()


def test_unknown_vocabulary_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown vocabulary 'moods'.*emotions, problems"):
        vocabulary("moods")


def test_principles_emotion_field_resolves_to_the_shared_cues() -> None:
    emotion = load_principles().field("emotion")
    assert emotion is not None
    assert emotion.options == {label: list(cues) for label, cues in emotions().items()}


def _principles_file(tmp_path: Path, options: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\nname: x\nguidelines: {do: [], avoid: []}\nreflection_fields:\n"
        f"  - {{name: emotion, question: q, prefix: p, options: {options}}}\n",
        encoding="utf-8",
    )
    return path


def test_principles_may_name_a_vocabulary(tmp_path: Path) -> None:
    field = load_principles(_principles_file(tmp_path, "problems")).field("emotion")
    assert field is not None and field.options is not None
    assert set(field.options) == ESCONV_PROBLEMS


def test_principles_naming_an_unknown_vocabulary_fail(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown vocabulary 'moods'"):
        load_principles(_principles_file(tmp_path, "moods"))


def test_cue_matching() -> None:
    assert re.search(cue_pattern("job"), "lost my job.")
    assert not re.search(cue_pattern("job"), "jobless")  # a whole word, not a stem
    assert re.search(cue_pattern("laid off"), "was laid off last week")
    assert set(matched_labels("not angry, just sad", emotions())) == {"sadness"}  # negated cue skipped
    assert set(matched_labels("not angry, just sad", emotions(), negation=False)) == {"anger", "sadness"}
    assert match_option("sad, angry and anxious", emotions()) is None  # three labels: an echo, not a choice
    assert match_option("in pain", emotions()) == "pain"


@pytest.mark.parametrize(
    ("inferred", "gold", "kind", "expected"),
    [
        ("anxious", "anxiety", "emotion", True),
        ("worried sick about the exam", "anxiety", "emotion", True),
        ("made a mistake", "anger", "emotion", False),  # `mad` is a whole word
        ("mad at her boss", "anger", "emotion", True),
        ("in pain", "pain", "emotion", True),
        ("not angry at all", "anger", "emotion", False),  # a negated cue names nothing
        ("anxeity", "anxiety", "emotion", True),  # fuzzy
        ("lost my job", "job crisis", "problem", True),
        ("got laid-off", "job crisis", "problem", True),  # punctuation does not hide a cue
        ("exam stress", "job crisis", "problem", False),
        ("i have no friends", "problems with friends", "problem", True),  # a negation still names a problem
        ("can't sleep at night", "Sleep Problems", "problem", True),
        ("exam stress", "academic pressure", "problem", True),
        ("her son keeps lying", "issues with children", "problem", True),
        ("lesson plans", "issues with children", "problem", False),  # `son` is a whole word
        ("being bullied at school", "school bullying", "problem", True),
        ("homesick", "homesickness", "problem", False),  # outside the vocabulary: exact or fuzzy only
        ("homesickness", "homesickness", "problem", True),
        ("homesicknes", "homesickness", "problem", True),
    ],
)
def test_label_matches(inferred: str, gold: str, kind: str, expected: bool) -> None:
    assert label_matches(inferred, gold, kind) is expected
