"""Corpus statistics for `esc-evolve data stats`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from statistics import mean

from esc_evolve.data.schema import Conversation


@dataclass
class CorpusStats:
    conversations: int
    utterances: int
    seeker_utterances: int
    supporter_utterances: int
    unlabelled_supporter_utterances: int
    strategies: Counter[str] = field(default_factory=Counter)
    emotions: Counter[str] = field(default_factory=Counter)
    problems: Counter[str] = field(default_factory=Counter)
    experiences: Counter[str] = field(default_factory=Counter)
    mean_utterances_per_conversation: float = 0.0
    mean_words_seeker: float = 0.0
    mean_words_supporter: float = 0.0


def corpus_stats(conversations: list[Conversation]) -> CorpusStats:
    turns = [t for c in conversations for t in c.turns]
    seeker = [t for t in turns if t.speaker == "seeker"]
    supporter = [t for t in turns if t.speaker == "supporter"]
    return CorpusStats(
        conversations=len(conversations),
        utterances=len(turns),
        seeker_utterances=len(seeker),
        supporter_utterances=len(supporter),
        unlabelled_supporter_utterances=sum(1 for t in supporter if t.strategy is None),
        strategies=Counter(t.strategy for t in supporter if t.strategy),
        emotions=Counter(c.profile.emotion_type or "(none)" for c in conversations),
        problems=Counter(c.profile.problem_type or "(none)" for c in conversations),
        experiences=Counter(c.profile.experience_type or "(none)" for c in conversations),
        mean_utterances_per_conversation=mean(len(c.turns) for c in conversations),
        mean_words_seeker=mean(len(t.text.split()) for t in seeker) if seeker else 0.0,
        mean_words_supporter=mean(len(t.text.split()) for t in supporter) if supporter else 0.0,
    )
