"""Does a model's free-text inference ("anxious about losing her job") name the seeker's gold label?

Rule (documented in docs/evaluation.md), applied after `normalize_emotion` / `normalize_problem`:
1. exact: the normalised inference equals the gold label; else
2. keyword: a word of the inference starts with one of the gold label's keyword patterns below (regular
   expressions anchored at a word start, so "anxious" and "anxiety" both match `anxi`, "lost my job" matches
   job crisis, and `mad\b` does not match "made"); else
3. fuzzy: difflib ratio >= 0.85 between the gold label and some window of as many words of the inference
   (catches misspellings such as "anxeity").
An inference that names several labels is credited if any of them is the gold one (reported as such).
"""

from __future__ import annotations

import difflib
import re

from esc_evolve.data.labels import normalize_emotion, normalize_problem

FUZZY_RATIO = 0.85

EMOTION_PATTERNS: dict[str, tuple[str, ...]] = {
    "anxiety": ("anxi", "worri", "worry"),
    "depression": ("depress", "hopeless"),
    "sadness": ("sad", "unhapp", "sorrow", "grie", "heartbr"),
    "anger": ("anger", "angry", r"mad\b", "furious", "frustrat", "irritat", "annoy"),
    "fear": ("fear", "afraid", "scare", "terrif", "frighten"),
    "disgust": ("disgust", "revolt"),
    "shame": ("shame", "ashamed", "embarrass", "humiliat"),
    "nervousness": ("nervous", "uneasy", "tense"),
    "guilt": ("guilt",),
    "jealousy": ("jealous", "envy", "envious"),
    "pain": (r"pain", "hurt"),
}

PROBLEM_PATTERNS: dict[str, tuple[str, ...]] = {
    "ongoing depression": ("depress",),
    "job crisis": (r"jobs?\b", "work", "career", "unemploy", "laid off", "fired", "employ", "boss", "layoff"),
    "breakup with partner": (
        "breakup",
        "break up",
        "broke up",
        "partner",
        "boyfriend",
        "girlfriend",
        "relationship",
        "divorce",
        "spouse",
        "husband",
        "wife",
    ),
    "problems with friends": ("friend",),
    "academic pressure": (
        "academ",
        "school",
        "exam",
        r"stud(?:y|ies|ying|ents?)\b",
        "college",
        "universit",
        "grade",
        "class",
        "homework",
    ),
    "sleep problems": ("sleep", "insomnia"),
    "issues with parents": ("parent", "mother", "father", r"moms?\b", r"dads?\b"),
    "issues with children": ("child", r"sons?\b", "daughter", r"kids?\b"),
    "appearance anxiety": ("appearance", "weight", r"looks\b", r"body\b"),
    "alcohol abuse": ("alcohol", "drink"),
    "procrastination": ("procrastinat",),
    "school bullying": ("bull",),
}


def label_matches(inferred: str | None, gold: str | None, kind: str) -> bool | None:
    """True/False, or None when either side is missing. kind: 'emotion' or 'problem'."""
    normalize, patterns = (
        (normalize_emotion, EMOTION_PATTERNS) if kind == "emotion" else (normalize_problem, PROBLEM_PATTERNS)
    )
    guess, truth = normalize(inferred), normalize(gold)
    if not guess or not truth:
        return None
    if guess == truth:
        return True
    tokens = re.findall(r"[a-z]+", guess)
    text = " ".join(tokens)
    if any(re.search(rf"\b(?:{pattern})", text) for pattern in patterns.get(truth, ())):
        return True
    width = len(truth.split())
    windows = [" ".join(tokens[i : i + width]) for i in range(max(len(tokens) - width + 1, 1))]
    return any(difflib.SequenceMatcher(None, truth, w).ratio() >= FUZZY_RATIO for w in windows)
