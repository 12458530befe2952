"""What a text says that is specific to one seeker: its content terms, and whether it is grounded in their words.

A small model's reflection often fits anyone ("a stressful situation", "is very emotional"). A situation counts
only when it names something the seeker said: by default a *content term* it shares with the seeker's own turns
(`lexical`), or optionally a sentence embedding close enough to one of their turns (`embedding`, the packaged
MiniLM that evaluation uses). Content terms are the words left after removing stopwords, words that fit any
seeker's story ("situation", "difficult", "feeling", "life") and emotion words (an emotion restates how they
feel, not what happened), reduced by a crude suffix stemmer so that "divorced" meets "divorce". The same terms
tell whether a refined reply uses something from the reflection (filters.py) and whether two free-text answers
agree (self-consistency, reflection.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from esc_evolve.data.vocabulary import cue_pattern, emotions
from esc_evolve.text import edit_ratio, words

GroundingMode = Literal["lexical", "embedding", "off"]


def _word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Function words, pronouns and contractions (words() keeps inner apostrophes: "i'm", "don't").
STOPWORDS = _word_set(
    """
    a about above after again against all am an and any are aren't as at be because been before being below between
    both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each few for from
    further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself him himself his
    how how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more most mustn't my myself no nor
    not of off on once only or other ought our ours ourselves out over own same shan't she she'd she'll she's should
    shouldn't so some such than that that's the their theirs them themselves then there there's these they they'd
    they'll they're they've this those through to too under until up very was wasn't we we'd we'll we're we've were
    weren't what what's when when's where where's which while who who's whom why why's will with won't would
    wouldn't you you'd you'll you're you've your yours yourself yourselves also just really even still yet ever
    never always often sometimes maybe perhaps quite rather though although however since each every anyone
    anybody everyone everybody whether etc
    im ive id ill hes shes theyre youre thats dont cant wont didnt doesnt isnt wasnt arent havent couldnt wouldnt
    shouldnt rn thx ty lol ok hm hmm um uh bye yep nope ya yea guess actually basically literally probably
    definitely totally honestly exactly seriously anyway anyways
    """
)

# Words that fit any seeker's story or any reply to one: a text made only of these is generic. Critique words
# ("concise", "empathetic", "acknowledge") are here too: a critique naming only them names nothing about the person.
GENERIC_WORDS = _word_set(
    """
    situation situations circumstance circumstances difficult difficulty difficulties stressful hard tough bad good
    great fine okay ok alright well better worse worst best problem problems issue issues matter matters trouble
    feel feels feeling feelings felt emotion emotions emotional emotionally mood moods person people persons someone
    somebody something anything everything nothing thing things stuff lot lots life time times way ways day days
    moment moments lately recently currently current today now right kind bit little much many able sure yeah yes hi
    hello hey thanks thank sorry please tell told telling said say says saying talk talks talking talked speak
    conversation get gets getting got go goes going went gone come comes coming came know knows knew think thinks
    thought want wants wanted need needs needed like likes make makes made take takes took seem seems seemed look
    looks looked try tries trying tried deal deals dealing dealt handle handling cope coping experience
    experiences experiencing going through challenge challenges challenging struggle struggles struggling
    help helps helping helped support supports supportive supporting understand understanding understood listen
    listening heard hear hearing vent venting share sharing open express expressing tendency tendencies personality
    type sort certain specific specifically personal general generally particular concise point direct short shorter
    brief briefly clear clearly empathetic empathy empathise empathize compassionate warm warmth validate validating
    validation acknowledge acknowledging acknowledgement reassure reassuring reassurance encourage encouraging
    comfort comforting advice suggestion suggestions suggest question questions ask asking reply replies response
    responses answer draft tone words word mention mentioning focus focusing instead rather less more add adding
    avoid include including use using fit fits better sound sounds sounding express themselves themself
    someone's one ones two new old lot full whole real true many own next last first hope hoping pissed upset
    """
)

_MIN_WORD = 3  # shorter words ("ex", "go") carry too little; numbers of two digits or more ("15", "2am") count


def stem(word: str) -> str:
    """A crude suffix stemmer: enough for "divorced"/"divorce", "jobs"/"job", "working"/"worked"; not a lemmatiser."""
    word = word.removesuffix("'s")
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    for suffix in ("ing", "ed", "es", "s", "ly"):
        if word.endswith(suffix) and not word.endswith("ss") and len(word) - len(suffix) >= _MIN_WORD:
            word = word[: -len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > _MIN_WORD else word


@cache
def _generic_stems() -> frozenset[str]:
    return frozenset(stem(w) for w in STOPWORDS | GENERIC_WORDS)


def is_emotion_word(word: str) -> bool:
    """Whether `word` (lower case) is an emotion label or one of its single-word cues (data/vocabulary.yaml)."""
    return _emotion_word().fullmatch(word) is not None


@cache
def _emotion_word() -> re.Pattern[str]:
    cues = [cue for label, found in emotions().items() for cue in (label, *found) if " " not in cue.strip()]
    return re.compile("|".join(f"(?:{cue_pattern(c)}\\w*)" if c.endswith("*") else cue_pattern(c) for c in cues))


def is_content_word(word: str) -> bool:
    if word.isdigit():
        return len(word) >= 2
    if len(word) < _MIN_WORD or word in STOPWORDS or word in GENERIC_WORDS:
        return False
    return stem(word) not in _generic_stems() and not is_emotion_word(word)


def content_words(text: str) -> list[str]:
    """The content words of `text`, in order, as written (lower-cased)."""
    return [w.removesuffix("'s") for w in words(text) if is_content_word(w.removesuffix("'s"))]


def content_terms(text: str) -> set[str]:
    """The stems of `text`'s content words: what it says that could be specific to one person."""
    return {stem(w) for w in content_words(text)}


def term_agreement(a: str, b: str) -> float:
    """How far two free-text answers say the same thing: Jaccard overlap of their content terms, or word-level
    similarity when neither has a content term."""
    ta, tb = content_terms(a), content_terms(b)
    if not ta and not tb:
        return 1.0 - edit_ratio(a, b)
    return len(ta & tb) / len(ta | tb)


@dataclass(frozen=True)
class Grounding:
    """Whether a text names something the seeker said: the shared terms (lexical) or the best cosine (embedding)."""

    grounded: bool
    terms: tuple[str, ...] = ()
    similarity: float | None = None


def lexical_grounding(text: str, seeker_texts: Sequence[str], min_terms: int = 1) -> Grounding:
    shared = content_terms(text) & content_terms(" ".join(seeker_texts))
    return Grounding(len(shared) >= min_terms, tuple(sorted(shared)))


class Grounder:
    """The grounding check `evolve.situation_grounding` names, with its thresholds; `embedder` (anything with
    `encode(texts) -> unit row vectors`, evaluation/embedding.py) is loaded on first use when not given."""

    def __init__(
        self, mode: GroundingMode, min_terms: int = 1, min_similarity: float = 0.5, embedder: Any = None
    ) -> None:
        self.mode = mode
        self.min_terms = min_terms
        self.min_similarity = min_similarity
        self._embedder = embedder

    def check(self, text: str, seeker_texts: Sequence[str]) -> Grounding:
        lexical = lexical_grounding(text, seeker_texts, self.min_terms)
        if self.mode != "embedding":
            return lexical
        said = [t for t in seeker_texts if t.strip()]
        if not said:
            return Grounding(False, lexical.terms, 0.0)
        vectors = self.embedder.encode([text, *said])
        best = float((vectors[1:] @ vectors[0]).max())
        return Grounding(best >= self.min_similarity, lexical.terms, round(best, 4))

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from esc_evolve.evaluation.embedding import TransformerEmbedder

            self._embedder = TransformerEmbedder(progress=False)
        return self._embedder
