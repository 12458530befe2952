"""The built-in conversations a reflection learns its form from (exemplars) and is compared against (probes).

- Exemplars (`exemplars.yaml`): hand-written answers to every reflection field for a few contexts of the packaged
  conversations, shown before each question as earlier turns (few-shot).
- Probes: other contexts of the packaged conversations, which M_t reflects on like any context. A field declared
  `check: distinct` in the principles (the critique) whose answer for a context nearly repeats M_t's answer for
  one of these unrelated conversations says nothing about this person: it is generic and carries no weight.

Both come from `builtin:train` only, so no evaluation split ever reaches a prompt; a context never sees an
exemplar or a probe of its own conversation (`for_context`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from esc_evolve.data import Turn, TurnSample, build_turn_samples, load_conversations
from esc_evolve.errors import ConfigError

PACKAGED = "exemplars.yaml"
SOURCE = "builtin:train"
# A probe is a context with this many turns at least: long enough that a specific critique has something to name.
_PROBE_MIN_TURNS = 3


class ExemplarSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sample: str = Field(description="A sample id of builtin:train.")
    turns: int = Field(5, ge=1, description="How many of the context's last turns are shown.")
    draft: str = Field(description="The draft reply the critique exemplar reads.")
    answers: dict[str, str] = Field(description="Field name -> the answer after that field's prefix.")


class ExemplarFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int
    exemplars: list[ExemplarSpec]


@dataclass(frozen=True)
class Exemplar:
    """One exemplar as shown: its conversation (to keep it away from its own contexts), turns, draft, answers."""

    conversation_id: str
    context: tuple[Turn, ...]
    draft: str
    answers: Mapping[str, str]


def load_exemplars(count: int) -> tuple[Exemplar, ...]:
    """The first `count` packaged exemplars, resolved against the built-in training conversations."""
    if count <= 0:
        return ()
    specs = _exemplar_file().exemplars
    if count > len(specs):
        raise ConfigError(f"evolve.reflection_exemplars={count}: {PACKAGED} has {len(specs)} exemplars")
    samples = _builtin_samples()
    return tuple(_resolve(spec, samples) for spec in specs[:count])


def probe_samples(count: int, avoid: Sequence[str] = ()) -> list[TurnSample]:
    """`count` contexts of different built-in training conversations, none of the conversations in `avoid` (the
    exemplars'): each conversation's first context with at least three turns, in file order."""
    chosen: list[TurnSample] = []
    seen = set(avoid)
    for sample in _builtin_samples().values():
        if sample.conversation_id not in seen and len(sample.context) >= _PROBE_MIN_TURNS:
            seen.add(sample.conversation_id)
            chosen.append(sample)
    if len(chosen) < count:
        raise ConfigError(f"evolve.generic_probes={count}: the built-in data has {len(chosen)} probe conversations")
    return chosen[:count]


def for_context(exemplars: Sequence[Exemplar], conversation_id: str) -> tuple[Exemplar, ...]:
    """The exemplars a context may see: none of its own conversation (its answers would be given away)."""
    return tuple(e for e in exemplars if e.conversation_id != conversation_id)


def _resolve(spec: ExemplarSpec, samples: Mapping[str, TurnSample]) -> Exemplar:
    sample = samples.get(spec.sample)
    if sample is None:
        raise ConfigError(f"{PACKAGED}: {spec.sample} is not a context of {SOURCE}")
    context = sample.context[-spec.turns :]
    if context[0].speaker != "seeker":
        raise ConfigError(f"{PACKAGED}: the last {spec.turns} turns of {spec.sample} do not start with the seeker")
    return Exemplar(sample.conversation_id, tuple(context), spec.draft, dict(spec.answers))


@cache
def _exemplar_file() -> ExemplarFile:
    text = resources.files("esc_evolve.evolve").joinpath(PACKAGED).read_text(encoding="utf-8")
    try:
        return ExemplarFile.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"<package>/{PACKAGED}: invalid exemplars file: {exc}") from None


@cache
def _builtin_samples() -> dict[str, TurnSample]:
    """Every context of the built-in training conversations, whole history, by sample id (in file order)."""
    conversations = load_conversations(SOURCE).conversations
    return {s.sample_id: s for s in build_turn_samples(conversations, context_window=0)}
