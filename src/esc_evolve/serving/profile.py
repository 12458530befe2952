"""Profile memory: the project's reflection, run on a live conversation, and the system message it leads to.

The same principles file as self-evolution (`evolve.principles_path` or the packaged one) names what is inferred:
emotion, intensity, situation, profile, need. Every field is asked on its own and answered after its fixed prefix,
all fields in one batched generate call, and parsed by the same tolerant parser (evolve/reflection.py). A field
that needs a draft reply (the critique) is left out: there is no draft here. With `serve.use_profile`, the reply
is generated with the newest profile in the system message: the refinement prompt without a draft.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from esc_evolve.data.schema import Turn
from esc_evolve.evolve.loop import reflection_prompt
from esc_evolve.evolve.principles import Principles, load_principles
from esc_evolve.evolve.refinement import refinement_system
from esc_evolve.evolve.reflection import FieldParse, Reflection, build_reflection
from esc_evolve.generation.types import GenerationRequest, Generator

SPEAKER_OF = {"user": "seeker", "assistant": "supporter"}


def profile_fields(principles: Principles) -> list[Any]:
    """The reflection fields a conversation alone can answer (not those that read a draft reply)."""
    return [f for f in principles.reflection_fields if not f.needs_draft]


def infer_profile(
    generator: Generator,
    messages: Sequence[dict[str, str]],
    principles: Principles | None = None,
    *,
    max_new_tokens: int | None = None,
) -> dict[str, str] | None:
    """What reflection infers about the seeker from `messages` (user/assistant chat messages; others are
    skipped): `{field name: parsed value}` for every field that parsed, None when none did or the seeker has said
    nothing. `max_new_tokens` caps each field's own budget. One batched `generate` call.

    The answers start after a fixed prefix (a `continuation`), so a remote OpenAI-compatible backend needs the
    served model's tokenizer (`OpenAIGenerator(..., tokenizer=...)`); without it this raises `GenerationError`.
    """
    principles = principles or load_principles()
    context = [
        Turn(speaker=SPEAKER_OF[m["role"]], text=m["content"])
        for m in messages
        if m.get("role") in SPEAKER_OF and m.get("content")
    ]
    if not any(t.speaker == "seeker" for t in context):
        return None
    fields = profile_fields(principles)
    max_context = getattr(generator, "max_context", None)
    tokenizer = generator.tokenizer
    requests = []
    for field in fields:
        max_new = min(field.max_new_tokens, max_new_tokens or field.max_new_tokens)
        budget = max_context - max_new if max_context and tokenizer is not None else None
        requests.append(
            GenerationRequest(
                messages=reflection_prompt(tokenizer, field, context, principles, "", budget),
                continuation=field.prefix,
                max_new_tokens=max_new,
                temperature=0.0,
                stop=("\n",),
                id=f"profile:{field.name}",
            )
        )
    results = generator.generate(requests, progress=False)
    reflection = build_reflection(principles, {f.name: r.text for f, r in zip(fields, results, strict=True)})
    profile = {f.name: reflection.value(f.name) for f in fields if reflection.value(f.name) is not None}
    return profile or None


def profile_system_prompt(base_system: str, profile: dict[str, Any], principles: Principles | None = None) -> str:
    """The system message for a reply that fits what is known about the seeker: the refinement prompt of
    self-evolution without a draft. Keys of `profile` that are not fields of the principles (`turn`, `time`)
    are ignored; a profile with no field leaves `base_system` as it is."""
    principles = principles or load_principles()
    parsed = {
        f.name: FieldParse(f.name, str(profile[f.name]), str(profile[f.name]), "ok")
        for f in profile_fields(principles)
        if profile.get(f.name)
    }
    if not parsed:
        return base_system
    return refinement_system(base_system, principles, Reflection(fields=parsed, required=()), None)
