"""Turn-level samples: for each supporter turn, the dialogue before it and the response to learn or judge."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict

from esc_evolve.data.schema import Conversation, SeekerProfile, Turn, group_consecutive, join_turns


class TurnSample(BaseModel):
    """One supporter turn in context.

    `context` holds merged turns (alternating speakers) and always starts with a seeker turn, as chat
    templates expect a user message first. `profile` is the seeker's gold profile: for evaluation only,
    it never enters a prompt.
    """

    model_config = ConfigDict(frozen=True)

    conversation_id: str
    turn_index: int
    context: tuple[Turn, ...]
    response: str
    strategy: str | None
    strategies: tuple[str, ...]
    profile: SeekerProfile

    @property
    def sample_id(self) -> str:
        return f"{self.conversation_id}#{self.turn_index}"


def build_turn_samples(conversations: Iterable[Conversation], context_window: int = 10) -> list[TurnSample]:
    """One sample per supporter block that follows at least one seeker turn.

    Consecutive supporter utterances form one response (their strategies are all kept, the first is the
    sample's `strategy`). `context_window` counts merged turns; 0 keeps the whole history.
    """
    samples: list[TurnSample] = []
    for conversation in conversations:
        groups = group_consecutive(conversation.turns)
        merged = [join_turns(group) for group in groups]
        for index, group in enumerate(groups):
            if group[0].speaker != "supporter":
                continue
            context = _window(merged[:index], context_window)
            if not context:
                continue  # the supporter opens the chat: nothing to respond to
            samples.append(
                TurnSample(
                    conversation_id=conversation.id,
                    turn_index=index,
                    context=tuple(context),
                    response=merged[index].text,
                    strategy=merged[index].strategy,
                    strategies=tuple(t.strategy for t in group if t.strategy),
                    profile=conversation.profile,
                )
            )
    return samples


def _window(history: list[Turn], size: int) -> list[Turn]:
    kept = history[-size:] if size else list(history)
    while kept and kept[0].speaker != "seeker":
        kept = kept[1:]
    return kept
