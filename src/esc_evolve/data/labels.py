"""Canonical label sets and the normalisation of the spellings found across ESConv-family files."""

from __future__ import annotations

STRATEGIES: tuple[str, ...] = (
    "Question",
    "Restatement or Paraphrasing",
    "Reflection of feelings",
    "Self-disclosure",
    "Affirmation and Reassurance",
    "Providing Suggestions",
    "Information",
    "Others",
)

# Spellings seen in ESConv.json, FailedESConv.json, the HF split and MultiESC, mapped to the 8 labels.
# MultiESC merges two labels into "Providing Suggestions or Information" and splits "Greeting" off
# "Others"; both are lossy to map back, so we map to the label the supporter's act is closest to and
# keep the file's own spelling in Turn.raw_strategy.
_STRATEGY_ALIASES: dict[str, str] = {
    "questions": "Question",
    "other": "Others",
    "greeting": "Others",
    "restatement": "Restatement or Paraphrasing",
    "paraphrasing": "Restatement or Paraphrasing",
    "approval and reassurance": "Affirmation and Reassurance",
    "direct guidance": "Providing Suggestions",
    "providing suggestions or information": "Providing Suggestions",
}
_STRATEGY_BY_KEY = {s.lower(): s for s in STRATEGIES} | _STRATEGY_ALIASES

# Problem types are lower-cased; these are the variants that name the same problem.
_PROBLEM_ALIASES: dict[str, str] = {
    "conflict with parents": "issues with parents",
    "issues with parent": "issues with parents",
    "procrastination": "procrastination",
}


def normalize_strategy(raw: str | None) -> str | None:
    """Return one of STRATEGIES, or None for a missing label. Raises KeyError for an unknown label."""
    if raw is None:
        return None
    key = raw.strip().strip("[]").strip().lower()
    if not key:
        return None
    return _STRATEGY_BY_KEY[key]


def normalize_problem(raw: str | None) -> str | None:
    if raw is None:
        return None
    key = " ".join(raw.strip().lower().split())
    return _PROBLEM_ALIASES.get(key, key) or None


def normalize_emotion(raw: str | None) -> str | None:
    if raw is None:
        return None
    return raw.strip().lower() or None
