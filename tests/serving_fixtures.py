"""Helpers for the serving and chat tests: a scripted generator and a rule-only risk detector.

All text here is written for the tests (no corpus text).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from esc_evolve.generation import GenerationRequest, GenerationResult, Generator
from esc_evolve.safety import RiskAssessment, risk_rule_categories
from esc_evolve.safety.rules import URGENT_RULES

# Answers of the reflection fields, as a small model continues each prefix.
FIELD_ANSWERS = {
    "emotion": " anxiety.",
    "intensity": " 4.",
    "situation": " a work contract that may not be renewed.",
    "profile": " talks briefly and plainly about work.",
    "need": " reassurance.",
}
DEFAULT_REPLY = ["Waiting to hear ", "about your contract sounds hard. ", "What worries you most?"]


class ScriptedGenerator(Generator):
    """Streams scripted replies (lists of pieces, then `DEFAULT_REPLY`) and answers reflection fields with
    `FIELD_ANSWERS`; records every request, and how many streams the caller closed (or cancelled) before their
    end. `generate_stream` interleaves the pieces of its requests, as a batch decodes them."""

    def __init__(self, replies: Sequence[Sequence[str]] = (), fields: dict[str, str] | None = None) -> None:
        self.replies = [list(r) for r in replies]
        self.fields = FIELD_ANSWERS if fields is None else fields
        self.streamed: list[GenerationRequest] = []
        self.generate_calls: list[list[GenerationRequest]] = []
        self.stream_calls: list[list[GenerationRequest]] = []
        self.closed_early = 0

    def generate(self, requests, progress=True):
        self.generate_calls.append(list(requests))
        return [self._answer(r) for r in requests]

    def _answer(self, request: GenerationRequest) -> GenerationResult:
        if request.continuation:
            return GenerationResult(self.fields.get((request.id or "").rsplit(":", 1)[-1], ""), 4, "stop_string")
        return GenerationResult("".join(self._next()), 12, "stop")

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        self.streamed.append(request)
        finished = False
        try:
            yield from self.pieces(request)
            finished = True
        finally:
            if not finished:
                self.closed_early += 1

    def generate_stream(self, requests, on_text, cancelled=None):
        self.stream_calls.append(list(requests))
        self.streamed.extend(requests)
        sources = [iter(self.pieces(r)) for r in requests]
        texts: list[list[str]] = [[] for _ in requests]
        live = list(range(len(requests)))
        while live:
            for i in list(live):
                piece = None if cancelled and cancelled(i) else next(sources[i], None)
                if piece is None:
                    self.closed_early += bool(cancelled and cancelled(i))
                    live.remove(i)
                    continue
                texts[i].append(piece)
                on_text(i, piece)
        return [GenerationResult("".join(t), 12, "stop") for t in texts]

    def pieces(self, request: GenerationRequest) -> Iterator[str]:
        """The pieces of the reply to `request` (the next script)."""
        yield from self._next()

    def _next(self) -> list[str]:
        return self.replies.pop(0) if self.replies else list(DEFAULT_REPLY)


class RuleDetector:
    """The safety layer's explicit-phrase rules alone: urgent for an act, a method request or a threat, concern for
    other explicit risk, else none. Fast and predictable, for tests of what is done with an assessment."""

    def assess(self, text: str, history: Sequence[str] | None = None) -> RiskAssessment:
        found = risk_rule_categories(text)
        level = "urgent" if set(found) & URGENT_RULES else "concern" if found else "none"
        return RiskAssessment(level, 1.0 if found else 0.0, tuple(found), "rules (test)")

    def assess_many(self, texts, histories=None):
        return [self.assess(t) for t in texts]


URGENT = "I took the whole bottle of my pills an hour ago"
CONCERN = "I'm just a burden to all of them"
