"""Text checks shared by the metrics, the DPO filters and the reflection parser, each defined once here.

Tokenisation is pinned: NFKC-normalise, map curly quotes to straight ones, lower-case, then split into words
(letters/digits with inner apostrophes: "i'm", "don't") and single punctuation characters. It needs no
downloaded data (nltk's `word_tokenize` needs the punkt models), so results do not depend on what a machine has
installed, and BLEU, Distinct, length and the loop checks all count the same words.

The loop checks catch what small models do when they degenerate: one phrase repeated to the token limit
(`repeated_ngram_share`), one sentence said again and again (`sentence_repeats`), a short answer made of a few
words (`low_word_variety`), or an answer that ends by repeating its own earlier phrase (`ends_in_a_loop`).
Each caller keeps its own threshold: a metric, a filter and a parser tolerate different amounts.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections import Counter

_TOKEN = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
_WORD = re.compile(r"\w+(?:'\w+)*")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})
_SENTENCE_BREAK = re.compile(r"[.!?\n]+")

# A chat template's special tokens, or a speaker label opening a line: the model is writing the transcript
# (the next turn of another speaker) instead of its own answer.
ROLE_MARKER = re.compile(
    r"<\|im_(?:start|end)\|>|^\s*(?:user|assistant|system|person|seeker|supporter)\s*:",
    re.IGNORECASE | re.MULTILINE,
)
# Talk *about* the conversation ("the seeker feels...", "this story is...", "as an AI") instead of to the person:
# what a small model drifts into when asked to rewrite a reply.
_ABOUT_THE_CONVERSATION = re.compile(
    r"\bthe (?:seeker|user|supporter)\b|\bthis (?:story|dialogue|transcript)\b|\bas an ai\b", re.IGNORECASE
)


def normalize_text(text: str) -> str:
    """NFKC, straight quotes, lower case: the form every check below reads."""
    return unicodedata.normalize("NFKC", text).translate(_QUOTES).lower()


def tokenize(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens (the unit of BLEU and Distinct)."""
    return _TOKEN.findall(normalize_text(text))


def words(text: str) -> list[str]:
    """Lower-cased word tokens without punctuation (the unit of length and of the loop checks)."""
    return _WORD.findall(normalize_text(text))


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def is_empty(text: str) -> bool:
    """No word at all: whitespace, punctuation or an ellipsis is not a reply."""
    return not words(text)


def repeated_ngram_share(tokens: list[str], n: int = 3) -> float:
    """Share of n-gram occurrences that repeat an earlier one: 0 for no loop, close to 1 for a long loop.

    A model stuck in a loop repeats the same few phrases to the token limit; normal text rarely repeats a
    3-gram at all, so the share separates the two without a length cut-off."""
    grams = ngrams(tokens, n)
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(c - 1 for c in counts.values()) / len(grams)


def sentence_repeats(text: str, min_words: int = 1) -> int:
    """How often the most frequent sentence occurs (0 when none has `min_words` words).

    Catches the "I'm so sorry to hear that." loop even when each sentence is short, where 3-grams barely repeat.
    Sentences are compared by their words (case, quotes and punctuation ignored); `min_words` leaves out short
    ones ("Okay.") that may honestly come twice."""
    sentences = [" ".join(found) for part in _SENTENCE_BREAK.split(text) if len(found := words(part)) >= min_words]
    return max(Counter(sentences).values(), default=0)


def low_word_variety(text: str, min_words: int = 6, ratio: float = 0.4) -> bool:
    """Few distinct words in an answer of at least `min_words` ("sad sad sad sad sad sad"): a short loop that
    neither 3-grams nor sentences reveal."""
    found = words(text)
    return len(found) >= min_words and len(set(found)) / len(found) < ratio


def ends_in_a_loop(text: str, tail_words: int = 4) -> bool:
    """The last `tail_words` words already appeared earlier in the text ("a bit of a perfectionist, who is also a
    bit of a perfectionist"): a generation cut off while it starts over."""
    found = words(text)
    tail = found[-tail_words:]
    return len(found) >= 2 * tail_words and any(
        found[i : i + tail_words] == tail for i in range(len(found) - tail_words)
    )


def has_role_marker(text: str) -> bool:
    """A chat special token or a speaker label at a line start (see ROLE_MARKER)."""
    return ROLE_MARKER.search(text) is not None


def is_out_of_role(text: str) -> bool:
    """A reply that is not the supporter speaking to the person: it writes other turns (a role marker) or talks
    about the conversation ("the seeker", "this story", "as an AI")."""
    return has_role_marker(text) or _ABOUT_THE_CONVERSATION.search(text) is not None


def edit_ratio(a: str, b: str) -> float:
    """Word-level normalised edit distance in [0, 1] (difflib's matching-blocks ratio, on words): 0 for the same
    words, 1 for nothing in common. The pair filter's `too_similar` and the reflection's near-verbatim checks."""
    return 1.0 - difflib.SequenceMatcher(a=a.lower().split(), b=b.lower().split(), autojunk=False).ratio()
