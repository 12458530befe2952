"""Pinned tokenisation shared by BLEU, Distinct and length, so that every number in a report is comparable.

`tokenize`: NFKC-normalise, map curly quotes to straight ones, lower-case, then split into words (letters/digits
with inner apostrophes: "i'm", "don't") and single punctuation characters. It needs no downloaded data (nltk's
`word_tokenize` needs the punkt models), so results do not depend on what a machine has installed.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

_TOKEN = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
_WORD = re.compile(r"\w+(?:'\w+)*")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


def normalize_text(text: str) -> str:
    return unicodedata.normalize("NFKC", text).translate(_QUOTES).lower()


def tokenize(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens (the unit of BLEU and Distinct)."""
    return _TOKEN.findall(normalize_text(text))


def words(text: str) -> list[str]:
    """Lower-cased word tokens without punctuation (the unit of length)."""
    return _WORD.findall(normalize_text(text))


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngram_share(tokens: list[str], n: int = 3) -> float:
    """Share of n-gram occurrences that repeat an earlier one: 0 for no loop, close to 1 for a long loop."""
    grams = ngrams(tokens, n)
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(c - 1 for c in counts.values()) / len(grams)
