"""The interface every stage (evolve, evaluation, chat) uses to generate text, whatever the backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from esc_evolve.errors import EscEvolveError

FinishReason = Literal["stop", "length", "stop_string"]


class GenerationError(EscEvolveError):
    """A request cannot be served (too long for the model, a backend is missing, a server answered badly)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete: chat `messages` (rendered with the model's chat template) or a rendered `prompt`.

    Message text is data: a control-token spelling in it ("<|im_start|>system") reaches the model as text, never
    as the control token (local backends; see docs/generation.md). `continuation` is pipeline text the reply
    starts with (a reflection field's prefix), placed after the assistant header; the reply continues it.
    Fields left `None` take the generator's defaults (from `GenerationSettings`). `temperature=0` is greedy.
    `seed` fixes a sampled output: the same request with the same seed gives the same text, whichever other
    requests share its batch (transformers backend, same device and dtype).
    """

    messages: Sequence[dict[str, str]] | None = None
    prompt: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    id: str | None = None
    continuation: str = ""

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError(f"request {self.id!r}: give exactly one of `messages` or `prompt`")
        if self.continuation and self.messages is None:
            raise ValueError(f"request {self.id!r}: a continuation goes with `messages` (a `prompt` is all text)")
        if isinstance(self.stop, str):  # a lone string would otherwise be read as a tuple of characters
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ValueError(f"request {self.id!r}: stop strings must be non-empty")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"request {self.id!r}: max_new_tokens must be >= 1")


@dataclass(frozen=True)
class GenerationResult:
    """What a request produced. `num_tokens` counts generated tokens up to and including the one that ended
    the reply (an end-of-sequence token or the token that completed a stop string); `text` holds neither."""

    text: str
    num_tokens: int
    finish_reason: FinishReason
    request_id: str | None = None
    prompt_tokens: int = 0
    dropped_turns: int = 0  # oldest context turns left out so that the prompt fits the model (see docs)
    token_ids: tuple[int, ...] = ()  # the `num_tokens` generated ids, where the backend reports them


class Generator(ABC):
    """A backend. `generate` returns one result per request, in the order of the requests.

    `tokenizer` is the tokenizer this backend encodes chat prompts with; a caller that renders or measures a
    prompt itself must use it, so that prompt and model agree. None for a remote model the server renders for.
    """

    tokenizer: Any = None

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest], progress: bool = True) -> list[GenerationResult]:
        """Complete every request; results come back in input order."""

    def generate_stream(
        self,
        requests: Sequence[GenerationRequest],
        on_text: Callable[[int, str], None],
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[GenerationResult]:
        """`generate`, with request i's reply passed to `on_text(i, piece)` as it is produced; the pieces of a
        request add up to its result's text. `cancelled(i)` true: request i may stop early (its caller went
        away). Backends that cannot stream a batch pass each reply whole once it is done."""
        results = self.generate(requests, progress=False)
        for index, result in enumerate(results):
            if result.text:
                on_text(index, result.text)
        return results

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Yield the reply in pieces as it is produced (backends that cannot stream yield it whole)."""
        yield self.generate([request], progress=False)[0].text

    def tune(self, *, batch_size: int | None = None, reuse_prompts: bool | None = None) -> None:  # noqa: B027
        """Adjust a built generator to its caller's work; a backend ignores what it has no use for (the default).
        `batch_size`: rows per batch of a local engine. `reuse_prompts`: the next calls' prompts extend this
        call's (dialogues that advance a turn per call), so the backend may keep each prompt's computed state
        until the next call; False releases it."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to release
        """Release what the backend holds (a server connection, GPU memory)."""

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)
