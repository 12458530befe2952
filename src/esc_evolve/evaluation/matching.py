"""Does a model's free-text inference ("anxious about losing her job") name the seeker's gold label?

Rule (documented in docs/evaluation.md), applied after `normalize_emotion` / `normalize_problem`:
1. exact: the normalised inference equals the gold label; else
2. cue: the inference names the gold label by one of its cues in the shared vocabulary
   (esc_evolve/data/vocabulary.yaml, read by `vocabulary.matched_labels`, the reflection parser's own matching):
   "anxious" names anxiety (`anxi*`), "lost my job" names job crisis (`job`), "made" is not anger (`mad` is a
   whole word). A negated cue names no emotion ("not angry") but still names a problem ("no friends",
   "can't sleep"); else
3. fuzzy: difflib ratio >= 0.85 between the gold label and some window of as many words of the inference
   (catches misspellings such as "anxeity").
An inference that names several labels is credited if any of them is the gold one (reported as such). A gold
label the vocabulary does not list is matched by rules 1 and 3 only.
"""

from __future__ import annotations

import difflib

from esc_evolve.data.labels import normalize_emotion, normalize_problem
from esc_evolve.data.vocabulary import emotions, matched_labels, problems
from esc_evolve.text import words

FUZZY_RATIO = 0.85


def label_matches(inferred: str | None, gold: str | None, kind: str) -> bool | None:
    """True/False, or None when either side is missing. kind: 'emotion' or 'problem'."""
    normalize = normalize_emotion if kind == "emotion" else normalize_problem
    guess, truth = normalize(inferred), normalize(gold)
    if not guess or not truth:
        return None
    if guess == truth:
        return True
    tokens = words(guess)
    if _named_by_cue(" ".join(tokens), truth, kind):
        return True
    width = len(truth.split())
    windows = [" ".join(tokens[i : i + width]) for i in range(max(len(tokens) - width + 1, 1))]
    return any(difflib.SequenceMatcher(None, truth, w).ratio() >= FUZZY_RATIO for w in windows)


def _named_by_cue(text: str, label: str, kind: str) -> bool:
    """Rule 2, read on the words only so that "laid-off" reads as "laid off"; False for a label outside the
    vocabulary. Negation only clears emotions: "no friends" and "can't sleep" still name a problem."""
    cues = emotions() if kind == "emotion" else problems()
    if label not in cues:
        return False
    return label in matched_labels(text, {label: cues[label]}, negation=kind == "emotion")
