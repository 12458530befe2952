"""The one entry point from a data setting to turn samples: load, validate, cut samples.

Every stage and command reads data through `load_split` (or `load_train`), so each data setting
(`skip_invalid`, `context_window`, `max_conversations`) is honoured in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from esc_evolve.config import DataSettings
from esc_evolve.data.loaders import load_conversations
from esc_evolve.data.samples import TurnSample, build_turn_samples
from esc_evolve.data.schema import Conversation


@dataclass
class Split:
    """A data source read with the run's data settings: its conversations and their turn-level samples."""

    source: str
    format: str
    conversations: list[Conversation]
    samples: list[TurnSample]
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {
            "source": self.source,
            "format": self.format,
            "conversations": len(self.conversations),
            "samples": len(self.samples),
            "skipped_invalid": len(self.skipped),
        }

    def by_id(self) -> dict[str, TurnSample]:
        return {s.sample_id: s for s in self.samples}


def load_split(source: str | Path, settings: DataSettings, *, limit: int | None = None) -> Split:
    """The conversations of `source` (the first `limit`) and their samples, under `settings`."""
    loaded = load_conversations(source, skip_invalid=settings.skip_invalid, limit=limit)
    samples = build_turn_samples(loaded.conversations, settings.context_window)
    return Split(str(source), loaded.format, loaded.conversations, samples, loaded.skipped)


def load_train(settings: DataSettings) -> Split:
    """The training split, capped at `max_conversations`."""
    return load_split(settings.train_path, settings, limit=settings.max_conversations)
