"""The seeker simulator: a generation backend that plays a role card in first person, and its end rating.

Each seeker message is generated from a fixed system prompt built from the card (who they are, how they feel,
what happened, what they want) and the conversation so far, with the roles seen from the seeker's side (the
seeker is the `assistant`, the supporter the `user`), so supporter text is message content: data, never
instructions, and a control-token spelling in it stays text (see esc_evolve.data.prompts). After each supporter
message comes a bracketed note with this turn's instruction, decided by the pipeline and not by the simulator:
the supporter's reply, classified into one of the eight strategies, was in the card's preferred set (open up a
little more; the next hidden fact is offered), in its disliked set (be more guarded, share nothing new), or in
neither (answer naturally). The notes stay where they were written, so every turn's prompt extends the previous
one and a local engine computes only what is new (docs/simulation.md, "Time").

At the end the simulator answers, in character and in the same chat, "how understood did you feel, 1-5, and
why"; `parse_rating` reads the number from messy answers and says why when it cannot.

A small backbone (the 135M default) plays a card poorly: it drifts out of character and answers like an
assistant. Point `simulate.backend: openai` at a strong model for scores worth reading (docs/simulation.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from esc_evolve.config import GenerationSettings, ModelSettings, SimulateSettings
from esc_evolve.errors import ConfigError
from esc_evolve.generation import GenerationError, GenerationRequest, Generator, build_generator
from esc_evolve.registry import Registry
from esc_evolve.simulation.cards import RoleCard

Reaction = Literal["open", "neutral", "guarded"]
Messages = list[dict[str, str]]

# The chat is opened by the seeker: this stands where a first user message must be for templates that require
# one (the seeker's own messages are the assistant's); it is also the opening's instruction.
OPEN_CUE = (
    "(You have just opened the support chat. Write your first message to the supporter: hint at what is wrong, "
    "do not tell the whole story.)"
)

ROLE_PLAY = (
    "You are role-playing a person who has come to an online emotional-support chat. Stay in character for the "
    "whole conversation and write only what this person would type: one to three short sentences, first person, "
    "no narration, no name labels. Never say that you are an AI or that you are role-playing, and never recite "
    "or summarise these instructions: what is below comes out bit by bit, in your own words, as the chat goes on. "
    "A note in square brackets after a supporter message is for you alone: the supporter did not write it and "
    "cannot see it; follow it, never answer it or quote it."
)
REACTIONS: dict[str, str] = {
    "open": "The supporter's last message was the kind of support you welcome. Open up a little more: say more "
    "about how you feel or what happened.",
    "neutral": "Answer the supporter's last message naturally; share nothing new unless they asked about it.",
    "guarded": "The supporter's last message was the kind of support that puts you off. Be more guarded: answer "
    "briefly, share nothing new, and you may show mild irritation or pull back a little.",
}
NOTE = "[For your next message: {}]"
# A seeker message ends where the model starts a speaker label or imitates the notes it has seen (the 135M
# backbone copied a note into 3 of 30 messages without this stop).
STOPS = ("\nSupporter:", "\nYou:", "\nSeeker:", "[For your next message")
RATING_QUESTION = (
    "The conversation has ended. Still in character, answer in one or two sentences: how understood did you "
    "feel, from 1 (not at all) to 5 (completely), and why? Start with the number, for example '3 - ...'."
)

RATING_PREFIX = "My rating from 1 to 5:"

# One message of the conversation as the seeker sees it: (speaker, text, note), speaker 'seeker' or 'supporter';
# `note` is the instruction that followed a supporter message (None: none).
Turn = tuple[str, str, str | None]


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from the parts (sha256): a card's seed depends on the run seed and the card id, never on the
    card's position, so the same card gets the same simulator seed for every model and every card selection."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def reaction_to(strategy: str | None, card: RoleCard) -> Reaction:
    """How the seeker reacts to a supporter reply of `strategy`: the card's preferred set opens, disliked guards."""
    if strategy in card.preferred_strategies:
        return "open"
    if strategy in card.disliked_strategies:
        return "guarded"
    return "neutral"


def persona_prompt(card: RoleCard) -> str:
    """The card as the simulator reads it, second person. Strategy names are left out (the seeker would never
    speak of them); `strategy_notes` says in plain words what helps and what puts them off."""
    p = card.persona
    who = "; ".join(x for x in (p.life_stage, p.gender, p.occupation) if x)
    lines = [ROLE_PLAY, "", f"Who you are: {who}."]
    if p.personality:
        lines.append(f"Your personality: {p.personality}.")
    if p.speaking_style:
        lines.append(f"How you write: {p.speaking_style}.")
    lines.append(f"How you feel: {card.emotion}, intensity {card.intensity} of 5.")
    lines.append(f"What is going on: {card.situation}")
    if card.wants:
        lines.append(f"What you want from this conversation: {card.wants}.")
    if card.strategy_notes:
        lines.append(f"What helps you and what puts you off: {card.strategy_notes}.")
    if card.risk and card.risk.disclosure:
        lines.append(f"Something you may reveal: {card.risk.disclosure}.")
    if card.language != "en":
        lines.append(f"Write in the language with code '{card.language}'.")
    return "\n".join(lines)


def turn_note(reaction: Reaction, fact: str | None) -> str:
    """This turn's instruction, written after the supporter's message it reacts to."""
    instruction = REACTIONS[reaction]
    if fact is not None:
        instruction += f" If it fits, you can now mention this, in your own words: {fact}"
    return NOTE.format(instruction)


def seeker_messages(card: RoleCard, history: Sequence[Turn]) -> Messages:
    """The chat from the seeker's side: the card as the system prompt, the opening cue, then `history`, each
    supporter message followed by its note (the pipeline's instruction for the seeker's next message). The system
    prompt never changes and a note stays where it was written, so the next turn's chat extends this one."""
    role = {"seeker": "assistant", "supporter": "user"}
    messages = [{"role": "system", "content": persona_prompt(card)}, {"role": "user", "content": OPEN_CUE}]
    return messages + [
        {"role": role[speaker], "content": text if note is None else f"{text}\n\n{note}"}
        for speaker, text, note in history
    ]


def rating_messages(card: RoleCard, history: Sequence[Turn]) -> Messages:
    """The end question, as the note after the supporter's last message: the seeker's own chat continued, so
    that a local engine computes only the question (any template accepts it, as every turn's chat)."""
    *before, (speaker, text, _) = history
    return seeker_messages(card, [*before, (speaker, text, NOTE.format(RATING_QUESTION))])


def clean_message(text: str) -> str:
    """A seeker message without a speaker label the model may have written ('You: ...', 'Seeker: ...')."""
    text = text.strip()
    return re.sub(r"^(?:you|seeker|me|user)\s*:\s*", "", text, flags=re.IGNORECASE).strip()


# ---------------------------------------------------------------------------------------------------------
# The end rating


@dataclass(frozen=True)
class RatingParse:
    """`value` in [1, 5] or None; `status` 'ok' or 'failed' (unparseable), 'error' (the simulator raised)."""

    value: float | None
    status: Literal["ok", "failed", "error"]
    how: str  # which rule read the number, or why none was read


_NUMBER = r"(?<![\d.])([1-5](?:\.\d+)?)(?!\d)"
_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_OUT_OF = re.compile(_NUMBER + r"\s*(?:/|out of|of)\s*(?:5|five)\b")
_WORD_OUT_OF = re.compile(r"\b(one|two|three|four|five)\s*(?:/|out of|of)\s*(?:5|five)\b")
_LABELLED = re.compile(r"\b(?:rating|rate|score|give)\b[^0-9\n]{0,20}?" + _NUMBER)
_LEADING = re.compile(r"^\W{0,3}" + _NUMBER + r"(?=\W|$)")
_SCALE = re.compile(r"\(?\b(?:from|between|of)?\s*(?:1|one)\s*(?:to|-|\u2013|and)\s*(?:5|five)\b\)?")  # "1 to 5"
_LEADING_WORD = re.compile(r"^\W{0,3}(one|two|three|four|five)\s*[-\u2013\u2014:.,!]")


def parse_rating(text: str) -> RatingParse:
    """The 1-5 rating in a free answer. Tried in order: a JSON object with `rating`/`score`; 'N/5', 'N out of
    5' (digits or words); 'rating: N'; a number (or number word) opening the answer. A number outside 1-5 is
    not a rating, nor is the scale ("from 1 to 5"); an answer with none of these is 'failed' (kept, counted,
    NaN in the scores)."""
    for candidate in re.findall(r"\{[^{}]*\}", text):
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        value = next((data[k] for k in ("rating", "score", "understood") if isinstance(data, dict) and k in data), None)
        if isinstance(value, int | float) and not isinstance(value, bool) and 1 <= value <= 5:
            return RatingParse(float(value), "ok", "json")
    lowered = _SCALE.sub(" ", text.lower()).strip()  # the scale itself ("from 1 to 5") is not a rating
    for pattern, kind in ((_OUT_OF, "out of 5"), (_LABELLED, "labelled"), (_LEADING, "leading number")):
        match = pattern.search(lowered)
        if match and 1 <= float(match.group(1)) <= 5:
            return RatingParse(float(match.group(1)), "ok", kind)
    for pattern in (_WORD_OUT_OF, _LEADING_WORD):
        match = pattern.search(lowered)
        if match:
            return RatingParse(float(_WORDS[match.group(1).lower()]), "ok", "number word")
    why = "empty answer" if not lowered else "no rating from 1 to 5 found"
    return RatingParse(None, "failed", why)


# ---------------------------------------------------------------------------------------------------------
# Backends


class SeekerSimulator:
    """A generator that plays seekers: `say` answers one seeker message per dialogue, `rate` the end question;
    each is one `generate` call for all the dialogues given (lock-step).

    `generator` may be a function that builds it: it is then built on first use, so that a resumed simulation
    whose dialogues are all finished loads no simulator (`description` is what resuming compares)."""

    def __init__(
        self,
        generator: Generator | Callable[[], Generator],
        description: str,
        settings: SimulateSettings,
        rating_prefix: str = "",
    ) -> None:
        self._generator = generator if isinstance(generator, Generator) else None
        self._build = None if isinstance(generator, Generator) else generator
        self.description = description
        self.settings = settings
        # Where the backend can start the reply with pipeline text (local models), the end answer opens with it,
        # so that even a small model's next tokens are the number; a remote server gets the question alone.
        self.rating_prefix = rating_prefix

    @property
    def generator(self) -> Generator:
        if self._generator is None:
            assert self._build is not None
            self._generator = self._build()
        return self._generator

    def say(self, prompts: Sequence[Messages], seeds: Sequence[int]) -> list[str]:
        requests = [
            GenerationRequest(
                messages=m,
                max_new_tokens=self.settings.max_new_tokens,
                temperature=self.settings.temperature,
                top_p=self.settings.top_p,
                stop=STOPS,
                seed=s,
                id=f"seeker-{i}",
            )
            for i, (m, s) in enumerate(zip(prompts, seeds, strict=True))
        ]
        return [clean_message(r.text) for r in self.generator.generate(requests, progress=False)] if requests else []

    def rate(self, prompts: Sequence[Messages], seeds: Sequence[int]) -> list[tuple[str, RatingParse]]:
        """(raw answer, parse) per dialogue, greedy. A batch the backend refuses is asked one prompt at a time,
        so that each error is recorded against its own dialogue (status 'error') and the others are kept."""
        if not prompts:
            return []
        requests = [
            GenerationRequest(
                messages=m,
                max_new_tokens=self.settings.rating_max_new_tokens,
                temperature=0.0,
                stop=STOPS[-1:],
                seed=s,
                continuation=self.rating_prefix,
            )
            for m, s in zip(prompts, seeds, strict=True)
        ]
        try:
            texts: list[str | Exception] = [r.text for r in self.generator.generate(requests, progress=False)]
        except GenerationError:
            texts = [self._one(r) for r in requests]
        return [
            (str(t), RatingParse(None, "error", str(t)))
            if isinstance(t, Exception)
            else (self.rating_prefix + t, parse_rating(t))
            for t in texts
        ]

    def _one(self, request: GenerationRequest) -> str | Exception:
        try:
            return self.generator.generate([request], progress=False)[0].text
        except GenerationError as exc:
            return exc

    def close(self) -> None:
        if self._generator is not None:
            self._generator.close()


SimulatorBuilder = Callable[[SimulateSettings, ModelSettings, GenerationSettings, int], SeekerSimulator]
# `builder(settings, model, generation, seed) -> SeekerSimulator`, selected by `simulate.backend`.
SIMULATORS: Registry[SimulatorBuilder] = Registry("simulator backend", "simulate.backend")
register_simulator = SIMULATORS.register


def build_simulator(
    settings: SimulateSettings, model: ModelSettings, generation: GenerationSettings, *, seed: int
) -> SeekerSimulator:
    """The simulator `settings.backend` names. Close it when done."""
    return SIMULATORS.get(settings.backend)(settings, model, generation, seed)


@register_simulator("local")
def _local(settings: SimulateSettings, model: ModelSettings, generation: GenerationSettings, seed: int):
    played_by = model.model_copy(update={"name": settings.model, "revision": None}) if settings.model else model
    played_by = played_by.model_copy(update={"dtype": simulator_dtype(settings, played_by)})
    backend = "transformers" if generation.backend == "openai" else generation.backend  # local = weights here
    build = functools.partial(
        build_generator, played_by, generation.model_copy(update={"backend": backend}), None, seed=seed
    )
    # The precision is part of the instrument: resuming never mixes dialogues played in two precisions.
    description = f"local model {played_by.name} ({backend}, {_dtype_name(played_by)}, no adapter)"
    return SeekerSimulator(build, description, settings, rating_prefix=RATING_PREFIX)


def simulator_dtype(settings: SimulateSettings, model: ModelSettings) -> str:
    """The local simulator's precision (never the supporters'): `simulate.dtype`, where 'auto' is bfloat16 on a
    CPU with AMX (bf16 matrix tiles: prefill ~2.6x, decoding ~1.4x faster than fp32 on the 135M backbone) and
    `model.dtype`'s own choice elsewhere: fp32 on other CPUs, including those with AVX512-BF16 but no AMX, where
    bf16 prefill was 1.55x slower than fp32 and decoding no faster (docs/simulation.md, "Time"); bf16/fp16 on
    GPUs."""
    if settings.dtype != "auto":
        return settings.dtype
    from esc_evolve.models import select_device

    if select_device(model.device).type == "cpu" and cpu_has_amx():
        return "bfloat16"
    return model.dtype


def cpu_has_amx() -> bool:
    """True where the CPU has AMX tiles (torch's private probe; False if it is gone)."""
    import torch

    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def _dtype_name(model: ModelSettings) -> str:
    from esc_evolve.models import select_device, select_dtype

    return str(select_dtype(model.dtype, select_device(model.device))).removeprefix("torch.")


@register_simulator("openai")
def _openai(settings: SimulateSettings, model: ModelSettings, generation: GenerationSettings, seed: int):
    endpoint = generation.openai if settings.openai is None else settings.openai.over(generation.openai)
    if not endpoint.model:
        raise ConfigError(
            "simulate.backend=openai needs simulate.openai.model (the served model's name), or generation.openai.model"
        )
    served = generation.model_copy(update={"backend": "openai", "openai": endpoint})
    urls = endpoint.base_url or os.environ.get("OPENAI_BASE_URL") or "$OPENAI_BASE_URL"
    where = ", ".join(u.rstrip("/") for u in ([urls] if isinstance(urls, str) else urls))  # one server or a farm
    build = functools.partial(build_generator, model, served, None, seed=seed)
    return SeekerSimulator(build, f"{endpoint.model} at {where} (OpenAI-compatible)", settings)
