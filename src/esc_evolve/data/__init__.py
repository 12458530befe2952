"""Emotional-support conversations: schema, loaders, turn samples, prompts, statistics.

`load_split(source, data_settings)` is the one way stages and commands read data (see splits.py)."""

from esc_evolve.data.loaders import LoadResult, load_conversations
from esc_evolve.data.samples import TurnSample, build_turn_samples
from esc_evolve.data.schema import Conversation, SeekerProfile, Turn
from esc_evolve.data.splits import Split, load_split, load_train

__all__ = [
    "Conversation",
    "LoadResult",
    "SeekerProfile",
    "Split",
    "Turn",
    "TurnSample",
    "build_turn_samples",
    "load_conversations",
    "load_split",
    "load_train",
]
