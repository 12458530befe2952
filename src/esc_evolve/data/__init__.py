"""Emotional-support conversations: schema, loaders, turn samples, prompts, statistics."""

from esc_evolve.data.loaders import LoadResult, load_conversations
from esc_evolve.data.samples import TurnSample, build_turn_samples
from esc_evolve.data.schema import Conversation, SeekerProfile, Turn

__all__ = [
    "Conversation",
    "LoadResult",
    "SeekerProfile",
    "Turn",
    "TurnSample",
    "build_turn_samples",
    "load_conversations",
]
