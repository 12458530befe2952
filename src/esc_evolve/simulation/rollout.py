"""Rollouts: every model talks with every card's simulated seeker, in lock-step, and the transcripts are kept.

One model at a time, all its dialogues advance together: each turn is one `generate` call for all the supporter
replies of that turn and one for all the seeker replies (plus one for the openings of cards that have none, and
one for the end ratings). After each supporter turn the replies are classified into strategies (one embedding
call); the strategy decides the seeker's reaction (see simulator.py), and is kept in the transcript, where the
scores read it.

Every card has its own seed, derived from the run seed and the card id (never its position), and every request
its own seed derived from the card's, so the same card gets the same simulator seed for every model and any card
selection, and a rerun gives the same transcripts. Transcripts are a JSONL file, one dialogue a line, rewritten
atomically after each model; a finished dialogue (same model, card, turns and simulator) is not rerun.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from esc_evolve.config import SimulateSettings
from esc_evolve.data.prompts import ROLE_OF
from esc_evolve.errors import DataFormatError
from esc_evolve.generation import GenerationRequest, Generator
from esc_evolve.simulation.cards import RoleCard
from esc_evolve.simulation.simulator import (
    Reaction,
    SeekerSimulator,
    derive_seed,
    rating_messages,
    reaction_to,
    seeker_messages,
    turn_note,
)
from esc_evolve.storage import write_atomic

log = logging.getLogger(__name__)

Classify = Callable[[list[str]], list[str]]  # supporter texts -> one strategy label each (one batched call)


class TurnRecord(BaseModel):
    """One message. Supporter turns carry their classified `strategy` and the `reaction` it caused; seeker turns
    the `reaction` they were asked to play and the index of the hidden `fact` offered to them, if any."""

    model_config = ConfigDict(extra="forbid")

    speaker: Literal["seeker", "supporter"]
    text: str
    strategy: str | None = None
    reaction: Reaction | None = None
    fact: int | None = None


class RatingRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: float | None
    status: Literal["ok", "failed", "error"]
    how: str
    raw: str


class Dialogue(BaseModel):
    """One model's conversation with one card's simulated seeker: a line of transcripts.jsonl."""

    model_config = ConfigDict(extra="forbid")

    model: str
    card_id: str
    seed: int
    turns_planned: int
    simulator: str
    supporter: str
    turns: list[TurnRecord] = []
    rating: RatingRecord | None = None
    finished: bool = False

    def history(self) -> list[tuple[str, str]]:
        return [(t.speaker, t.text) for t in self.turns]

    def seeker_view(self, fact_text: Callable[[int], str]) -> list[tuple[str, str, str | None]]:
        """The conversation as the seeker saw it: each supporter message followed by the note of the seeker
        message that answered it (its reaction and offered fact, `fact_text(index)`), so that each turn's chat
        is the last one extended."""
        view: list[tuple[str, str, str | None]] = []
        for turn, after in zip(self.turns, [*self.turns[1:], None], strict=True):
            note = None
            if turn.speaker == "supporter" and after is not None and after.reaction is not None:
                note = turn_note(after.reaction, None if after.fact is None else fact_text(after.fact))
            view.append((turn.speaker, turn.text, note))
        return view

    def supporter_turns(self) -> list[TurnRecord]:
        return [t for t in self.turns if t.speaker == "supporter"]


@dataclass
class Supporter:
    """A model under test: its generator (built on demand, closed after its dialogues), system prompt and the
    label that says where it came from."""

    name: str
    label: str
    build: Callable[[], Generator]
    system_prompt: str | None


@dataclass
class _State:
    """A dialogue in progress, with the hidden facts still to offer."""

    card: RoleCard
    dialogue: Dialogue
    facts_left: list[int] = field(default_factory=list)


def card_seed(seed: int, card: RoleCard) -> int:
    return derive_seed(seed, "card", card.id)


def select_cards(cards: Sequence[RoleCard], max_cards: int | None, seed: int) -> list[RoleCard]:
    """All cards, or a seeded sample of `max_cards` in file order (the packaged file is grouped by problem, so its
    first N would all share one)."""
    if max_cards is None or max_cards >= len(cards):
        return list(cards)
    keep = set(random.Random(seed).sample(range(len(cards)), max_cards))
    return [card for i, card in enumerate(cards) if i in keep]


# ---------------------------------------------------------------------------------------------------------
# The lock-step loop


@contextlib.contextmanager
def tuned_for_dialogues(settings: SimulateSettings, dialogues: int, *generators: Generator) -> Iterator[None]:
    """The engines of one model's rollout of `dialogues` dialogues set up for it: batches of about
    `simulate.batch_size` rows, and each dialogue's prompt state kept from one turn to the next
    (`simulate.reuse_prompt_cache`; every call's prompts extend the previous call's). A fresh store per model, so
    that no model's dialogues start from another's; released at the end. Backends without these knobs (a
    server) ignore them."""
    rows = balanced_batch(dialogues, settings.batch_size) if settings.batch_size else None
    for generator in generators:
        generator.tune(batch_size=rows, reuse_prompts=settings.reuse_prompt_cache)
    try:
        yield
    finally:
        for generator in generators:
            generator.tune(reuse_prompts=False)


def balanced_batch(dialogues: int, batch_size: int) -> int:
    """Rows per batch that cut `dialogues` into as few batches as `batch_size` allows, of equal size: 67 in
    batches of 64 would leave a batch of 3 rows that costs nearly a full batch per decoding step (every step
    reads all the weights), so 34 + 33."""
    batches = max(1, math.ceil(dialogues / batch_size))
    return max(1, math.ceil(dialogues / batches))


def roll_out(
    cards: Sequence[RoleCard],
    supporter: Supporter,
    generator: Generator,
    simulator: SeekerSimulator,
    classify: Classify,
    *,
    turns: int,
    seed: int,
    on_step: Callable[[], None] | None = None,
) -> list[Dialogue]:
    """One model's dialogues with `cards`, `turns` supporter turns each, then the end ratings."""
    states = [
        _State(
            card,
            Dialogue(
                model=supporter.name,
                card_id=card.id,
                seed=card_seed(seed, card),
                turns_planned=turns,
                simulator=simulator.description,
                supporter=supporter.label,
            ),
            list(range(len(card.hidden_facts))),
        )
        for card in cards
    ]
    _openings(states, simulator)
    for turn in range(1, turns + 1):
        _supporter_turn(states, supporter, generator, classify, turn)
        if turn < turns:
            _seeker_turn(states, simulator, turn)
        if on_step:
            on_step()
    _ratings(states, simulator)
    if on_step:
        on_step()
    for state in states:
        state.dialogue.finished = True
    return [s.dialogue for s in states]


def _openings(states: list[_State], simulator: SeekerSimulator) -> None:
    """Cards with an opening start with it; the others' first messages are one simulator call."""
    missing = [s for s in states if s.card.opening is None]
    prompts = [seeker_messages(s.card, []) for s in missing]
    written = iter(simulator.say(prompts, [derive_seed(s.dialogue.seed, "seeker", 0) for s in missing]))
    for state in states:
        text = state.card.opening if state.card.opening is not None else next(written)
        state.dialogue.turns.append(TurnRecord(speaker="seeker", text=text))


def _supporter_turn(
    states: list[_State], supporter: Supporter, generator: Generator, classify: Classify, turn: int
) -> None:
    requests = [
        GenerationRequest(
            messages=_supporter_messages(s.dialogue, supporter.system_prompt),
            seed=derive_seed(s.dialogue.seed, "supporter", turn),
            id=f"{s.card.id}#{turn}",
        )
        for s in states
    ]
    texts = [r.text.strip() for r in generator.generate(requests, progress=False)]
    for state, text, strategy in zip(states, texts, classify(texts), strict=True):
        reaction = reaction_to(strategy, state.card)
        state.dialogue.turns.append(TurnRecord(speaker="supporter", text=text, strategy=strategy, reaction=reaction))


def _supporter_messages(dialogue: Dialogue, system_prompt: str | None) -> list[dict[str, str]]:
    """The chat as the supporter sees it (seeker = user), as `data.prompts.build_messages` builds a context."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": ROLE_OF[t.speaker], "content": t.text} for t in dialogue.turns]


def _seeker_turn(states: list[_State], simulator: SeekerSimulator, turn: int) -> None:
    """Each seeker answers as the supporter's last strategy makes them feel; an open seeker is offered the next
    hidden fact (one a turn, in the card's order), a neutral or guarded one none."""
    prompts, seeds, plans = [], [], []
    for state in states:
        reaction = state.dialogue.turns[-1].reaction or "neutral"
        fact = state.facts_left.pop(0) if reaction == "open" and state.facts_left else None
        text = state.card.hidden_facts[fact] if fact is not None else None
        *before, (speaker, last, _) = _seeker_view(state)
        prompts.append(seeker_messages(state.card, [*before, (speaker, last, turn_note(reaction, text))]))
        seeds.append(derive_seed(state.dialogue.seed, "seeker", turn))
        plans.append((reaction, fact))
    for state, text, (reaction, fact) in zip(states, simulator.say(prompts, seeds), plans, strict=True):
        state.dialogue.turns.append(TurnRecord(speaker="seeker", text=text, reaction=reaction, fact=fact))


def _seeker_view(state: _State) -> list[tuple[str, str, str | None]]:
    return state.dialogue.seeker_view(state.card.hidden_facts.__getitem__)


def _ratings(states: list[_State], simulator: SeekerSimulator) -> None:
    prompts = [rating_messages(s.card, _seeker_view(s)) for s in states]
    answers = simulator.rate(prompts, [derive_seed(s.dialogue.seed, "rating") for s in states])
    for state, (raw, parse) in zip(states, answers, strict=True):
        state.dialogue.rating = RatingRecord(value=parse.value, status=parse.status, how=parse.how, raw=raw)


# ---------------------------------------------------------------------------------------------------------
# Transcripts


class TranscriptStore:
    """transcripts.jsonl: one dialogue a line, the whole file rewritten atomically (a kill keeps the last one)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[Dialogue]:
        if not self.path.is_file():
            return []
        dialogues = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                dialogues.append(Dialogue.model_validate_json(line))
            except ValueError as exc:
                raise DataFormatError(f"{self.path}:{number}: not a dialogue record ({exc})") from None
        return dialogues

    def replace(self, dialogues: Sequence[Dialogue]) -> None:
        """Write `dialogues`, replacing the file's records of the same (model, card) and keeping the others."""
        keys = {(d.model, d.card_id) for d in dialogues}
        kept = [d for d in self.read() if (d.model, d.card_id) not in keys]
        write_atomic(self.path, "".join(d.model_dump_json() + "\n" for d in [*kept, *dialogues]))


def finished_dialogues(store: TranscriptStore, supporter: Supporter, simulator: str, turns: int) -> dict[str, Dialogue]:
    """This model's finished dialogues in the store that can be reused, by card id: same model label, simulator
    and number of turns (anything else is rerun and replaced)."""
    return {
        d.card_id: d
        for d in store.read()
        if d.finished
        and d.model == supporter.name
        and d.supporter == supporter.label
        and d.simulator == simulator
        and d.turns_planned == turns
    }


def rollout_progress(enabled: bool) -> Progress | None:
    """The rich bar of a simulation (stderr, as the generation bar): one task per model, a step per turn."""
    if not enabled:
        return None
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
