"""What a judge is: something that answers a list of chat prompts with one text each, in order.

Backends (a local model, an OpenAI-compatible server) subclass `Judge`; a plain `messages -> str` function is
wrapped in `CallableJudge`, so that users and tests can still pass a function.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

Messages = Sequence[dict[str, str]]


class Judge(ABC):
    """An LLM judge. `description` names it in the report and metrics.json.

    `chunk_size` is how many prompts one `ask` call should get (None: the asking layer's default). A judge that
    answers prompts one by one anyway says 1, so that a failing prompt is never asked twice."""

    description: str = "an LLM judge"
    chunk_size: ClassVar[int | None] = None

    @abstractmethod
    def ask(self, prompts: Sequence[Messages]) -> list[str]:
        """One answer per prompt, in order. May raise (the caller narrows a failure down to its prompt)."""

    def close(self) -> None:  # noqa: B027 - optional hook: most judges hold nothing to release
        """Release what the judge holds (a model in memory, a connection)."""

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CallableJudge(Judge):
    """A judge over a plain function `fn(messages) -> str`, called once per prompt, in order."""

    chunk_size: ClassVar[int | None] = 1

    def __init__(
        self, fn: Callable[[Messages], str], description: str = "a judge callable given to evaluate()"
    ) -> None:
        self.fn = fn
        self.description = description

    def ask(self, prompts: Sequence[Messages]) -> list[str]:
        return [_text(self.fn(messages)) for messages in prompts]


def _text(answer: object) -> str:
    return answer if isinstance(answer, str) else str(answer)
