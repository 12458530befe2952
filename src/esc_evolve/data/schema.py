"""Typed schema of an emotional-support conversation, whatever file it came from."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from esc_evolve.data.labels import STRATEGIES

Speaker = Literal["seeker", "supporter"]


class SeekerProfile(BaseModel):
    """What the seeker told the dataset, not the supporter: the implicit preferences a supporter infers.

    It is kept out of every model prompt and used only for evaluation.
    """

    model_config = ConfigDict(frozen=True)

    experience_type: str | None = None
    emotion_type: str | None = None
    problem_type: str | None = None
    situation: str | None = None
    initial_emotion_intensity: int | None = Field(None, ge=1, le=5)
    final_emotion_intensity: int | None = Field(None, ge=1, le=5)
    empathy: int | None = Field(None, ge=1, le=5)
    relevance: int | None = Field(None, ge=1, le=5)


class Turn(BaseModel):
    """One utterance. Strategy is one of the 8 canonical labels (supporter turns only)."""

    model_config = ConfigDict(frozen=True)

    speaker: Speaker
    text: str
    strategy: str | None = None
    raw_strategy: str | None = Field(None, description="The label as spelled in the source file.")
    feedback: int | None = Field(None, ge=1, le=5, description="Seeker's per-turn rating, where recorded.")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str | None) -> str | None:
        if value is not None and value not in STRATEGIES:
            raise ValueError(f"unknown strategy {value!r}; expected one of {', '.join(STRATEGIES)}")
        return value


class Conversation(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str = Field(description="'<file name>:<line or index>' for provenance.")
    profile: SeekerProfile
    turns: tuple[Turn, ...] = Field(min_length=1)

    @property
    def supporter_turns(self) -> list[Turn]:
        return [t for t in self.turns if t.speaker == "supporter"]


def group_consecutive(turns: tuple[Turn, ...] | list[Turn]) -> list[list[Turn]]:
    """Split a dialogue into blocks of consecutive utterances by one speaker."""
    groups: list[list[Turn]] = []
    for turn in turns:
        if groups and groups[-1][0].speaker == turn.speaker:
            groups[-1].append(turn)
        else:
            groups.append([turn])
    return groups


def join_turns(group: list[Turn]) -> Turn:
    """One turn from a block of one speaker's utterances (chat templates need alternating roles).

    The joined turn keeps the block's first strategy and last feedback.
    """
    strategies = [t.strategy for t in group if t.strategy]
    feedback = [t.feedback for t in group if t.feedback is not None]
    return group[0].model_copy(
        update={
            "text": " ".join(t.text for t in group),
            "strategy": strategies[0] if strategies else None,
            "raw_strategy": group[0].raw_strategy,
            "feedback": feedback[-1] if feedback else None,
        }
    )


def merge_consecutive(turns: tuple[Turn, ...] | list[Turn]) -> list[Turn]:
    return [join_turns(group) for group in group_consecutive(turns)]
