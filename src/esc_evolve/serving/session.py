"""`ChatSession`: one seeker's conversation with the model, the safety guard, the store and the profile memory.

Every seeker message goes through `SafetyGuard.before` first: when it answers with the safe reply, the model is
not asked and the safe reply is streamed like any reply (`last["safe_reply"]`). Otherwise the model's reply is
streamed through a check:

- A reply can only be checked whole, and a phrase already shown cannot be taken back. So the model's pieces are
  held back until a sentence ends (`.`, `!` or `?` and a space, or a line break), and each prefix up to there is
  checked with `unsafe_reply` before it is released. When a check fails, the model's stream is closed and the
  safe reply follows what was already shown (`last["replaced"]`); the sentence that failed is never shown.
- When the model is done, the whole reply goes through `SafetyGuard.after`: an unsafe ending is replaced the same
  way, and for a seeker at risk a reply that gives no resources gets the resources note appended
  (`last["resources_added"]`).

So the seeker sees text a sentence at a time, not a token at a time, and never an unchecked sentence. Safety
events are logged (level, categories, what was done) without the message text; the text itself is kept only in
the store, and only when the store is enabled.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from esc_evolve.evolve.principles import Principles, load_principles
from esc_evolve.generation.types import GenerationRequest, Generator
from esc_evolve.safety.detector import RiskAssessment
from esc_evolve.safety.guard import SafetyGuard
from esc_evolve.safety.rules import unsafe_reply
from esc_evolve.serving.profile import infer_profile, profile_system_prompt
from esc_evolve.serving.store import SeekerStore

log = logging.getLogger(__name__)

# Where a sentence ends: . ! ? (and closing quotes or brackets) followed by whitespace, or a line break.
_SENTENCE_END = re.compile(r"[.!?\u2026][\"')\]\u201d\u2019]*\s+|\n+")
_SEEKER_HISTORY = 3  # earlier seeker messages the guard reads with the new one (a short "yes" needs the question)

Stream = Callable[[GenerationRequest], Iterable[str]]


class ReplyInterrupted(Exception):
    """Raised by a reply's source when its reader went away (a client that disconnected): the reply is kept as far
    as it went and marked `interrupted`, not `error`."""


class ChatSession:
    """One seeker's conversation. Not thread-safe: one session answers one message at a time.

    `store` keeps the conversation and the inferred profiles (a disabled store keeps nothing; the session still
    remembers the conversation in memory). The stored conversation of `seeker` is picked up where it stopped.
    With `use_profile`, replies are generated with the newest profile in the system message. Generation
    overrides (`max_new_tokens`, `temperature`, `top_p`, `stop`) default to the generator's settings.
    """

    def __init__(
        self,
        generator: Generator,
        guard: SafetyGuard,
        store: SeekerStore,
        seeker: str,
        *,
        system_prompt: str,
        use_profile: bool = False,
        profile_every: int = 3,
        principles: Principles | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
    ) -> None:
        if profile_every < 1:
            raise ValueError("profile_every must be >= 1")
        self.generator = generator
        self.guard = guard
        self.store = store
        self.seeker = seeker
        self.system_prompt = system_prompt
        self.use_profile = use_profile
        self.profile_every = profile_every
        self.principles = principles or load_principles()
        self.generation: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "stop": tuple(stop),
        }
        stored = store.conversation(seeker)
        self.messages: list[dict[str, str]] = [{"role": row["role"], "content": row["text"]} for row in stored]
        self._last_turn = stored[-1]["turn"] if stored else -1  # the store's number of the newest message
        self.profile: dict[str, Any] | None = store.profile(seeker)
        self._profiled_at = self.user_turns if self.profile else 0
        self.last: dict[str, Any] = {}

    @property
    def user_turns(self) -> int:
        """The seeker's messages in the conversation so far."""
        return sum(m["role"] == "user" for m in self.messages)

    def system_message(self) -> str:
        """The system message of the next reply: with the profile in it when `use_profile` and one is known."""
        if self.use_profile and self.profile:
            return profile_system_prompt(self.system_prompt, self.profile, self.principles)
        return self.system_prompt

    # ------------------------------------------------------------------------------------------------------
    # A reply

    def reply(
        self,
        message: str,
        *,
        history: Sequence[dict[str, str]] | None = None,
        stream: Stream | None = None,
        **generation: Any,
    ) -> Iterator[str]:
        """Answer `message`; returns the reply's pieces (iterate them to produce it).

        The guard reads the message right away, so `last` says whether the safe reply answers before the first
        piece is asked for. `history` replaces the conversation before `message` (a client that holds the chat
        itself, as OpenAI's API does); `stream` replaces `generator.stream` (a server's batching engine);
        `generation` overrides max_new_tokens, temperature, top_p or stop for this reply. The exchange is added to
        the conversation (and the store) when the reply has been iterated, or as far as it went if it is closed
        early (`last["interrupted"]`) or the engine fails (`last["error"]`, the exception propagates).
        """
        if history is not None:
            self.messages = [
                {"role": m["role"], "content": m["content"]} for m in history if m.get("role") in ("user", "assistant")
            ]
        said = [m["content"] for m in self.messages if m["role"] == "user"][-_SEEKER_HISTORY:]
        guarded = self.guard.before(message, said)
        assessment = guarded.assessment
        self.last = {
            "assessment": assessment.to_dict(),
            "safe_reply": guarded.reply is not None,
            "replaced": False,
            "resources_added": False,
            "interrupted": False,
            "error": False,
        }
        self.last["turn"] = self.store.add_turn(self.seeker, "user", message, {"assessment": self.last["assessment"]})
        self.messages.append({"role": "user", "content": message})
        if guarded.reply is not None:
            self._log_event("answered with the safe reply", assessment)
            return self._recorded(_sentences(guarded.reply))
        request = self.request(**generation)
        pieces = (stream or self.generator.stream)(request)
        return self._recorded(self._checked(pieces, assessment))

    def request(self, **generation: Any) -> GenerationRequest:
        """The generation request for the model's next reply: system message and conversation so far."""
        unknown = set(generation) - set(self.generation)
        if unknown:
            raise TypeError(f"unknown generation override(s): {', '.join(sorted(unknown))}")
        settings = {**self.generation, **{k: v for k, v in generation.items() if v is not None}}
        settings["stop"] = tuple(settings["stop"] or ())
        messages = [{"role": "system", "content": self.system_message()}, *self.messages]
        return GenerationRequest(messages=messages, id=f"chat:{self.seeker}", **settings)

    def _checked(self, pieces: Iterable[str], assessment: RiskAssessment) -> Iterator[str]:
        """The model's pieces, released a sentence at a time after the safety check (module docstring)."""
        shown, pending = "", ""
        try:
            for piece in pieces:
                pending += piece
                ends = list(_SENTENCE_END.finditer(pending))
                if not ends:
                    continue
                cut = ends[-1].end()
                if unsafe_reply(shown + pending[:cut]):
                    yield self._replacement(shown, shown + pending[:cut], assessment)
                    return
                yield pending[:cut]
                shown, pending = shown + pending[:cut], pending[cut:]
            whole = shown + pending
            checked = self.guard.after(whole, assessment)
            if checked == whole:
                if pending:
                    yield pending
            elif checked.startswith(whole):
                if pending:
                    yield pending
                self.last["resources_added"] = True
                self._log_event("resources added to the model's reply", assessment)
                yield checked[len(whole) :]
            else:
                yield self._replacement(shown, whole, assessment)
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # stop the model (a replacement, or the caller stopped reading)

    def _replacement(self, shown: str, unsafe: str, assessment: RiskAssessment) -> str:
        self.last["replaced"] = True
        self._log_event("model reply replaced by the safe reply", assessment)
        safe = self.guard.after(unsafe, assessment)
        return f"\n\n{safe}" if shown.strip() else safe

    def _recorded(self, pieces: Iterator[str]) -> Iterator[str]:
        """Yield the pieces; then add what was shown to the conversation and the store."""
        shown: list[str] = []
        try:
            for piece in pieces:
                shown.append(piece)
                yield piece
        except (GeneratorExit, ReplyInterrupted):
            self.last["interrupted"] = True
            raise
        except Exception:
            self.last["error"] = True  # the engine failed: the exchange is kept as far as it went
            raise
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
            text = "".join(shown).strip()
            self.messages.append({"role": "assistant", "content": text})
            meta = {k: self.last[k] for k in ("safe_reply", "replaced", "resources_added", "interrupted", "error")}
            self._last_turn = self.store.add_turn(self.seeker, "assistant", text, meta)

    def _log_event(self, what: str, assessment: RiskAssessment) -> None:
        # Never the message text: the store holds it, when the store is on.
        log.warning(
            "safety: seeker %r, message level %s (score %.2f, categories %s): %s",
            self.seeker,
            assessment.level,
            assessment.score,
            ",".join(assessment.categories) or "-",
            what,
        )

    # ------------------------------------------------------------------------------------------------------
    # Profile memory and the seeker's controls

    def profile_due(self) -> bool:
        """Whether `profile_every` more seeker messages came since the last profile."""
        turns = self.user_turns
        return turns > 0 and turns % self.profile_every == 0 and turns != self._profiled_at

    def maybe_update_profile(self, *, force: bool = False) -> dict[str, Any] | None:
        """Every `profile_every` seeker messages (or now, with `force`): infer the profile from the conversation
        with reflection (one batched call), keep it (in the store when enabled) and return it with its turn;
        None when it was not due or nothing parsed."""
        if not (force or self.profile_due()):
            return None
        self._profiled_at = self.user_turns
        fields = infer_profile(self.generator, self.messages, self.principles)
        if fields is None:
            log.info("profile of seeker %r: no reflection field parsed at turn %d", self.seeker, len(self.messages))
            return None
        turn = self._last_turn if self._last_turn >= 0 else len(self.messages) - 1
        self.store.save_profile(self.seeker, fields, turn)
        self.profile = self.store.profile(self.seeker) or {"turn": turn, "time": None, **fields}
        return self.profile

    def reset(self) -> None:
        """Start the conversation over (stored conversation deleted); the profile is kept."""
        self.store.reset_conversation(self.seeker)
        self.messages = []
        self._last_turn = -1
        self._profiled_at = 0

    def forget(self) -> bool:
        """Delete everything kept about this seeker, stored and in memory; True if the store held anything."""
        removed = self.store.forget(self.seeker)
        self.messages = []
        self._last_turn = -1
        self.profile = None
        self._profiled_at = 0
        return removed


def _sentences(text: str) -> Iterator[str]:
    """A fixed text in sentence-sized pieces, streamed like a model's reply."""
    start = 0
    for end in _SENTENCE_END.finditer(text):
        yield text[start : end.end()]
        start = end.end()
    if start < len(text):
        yield text[start:]
