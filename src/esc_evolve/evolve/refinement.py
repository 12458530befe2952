"""Self-refinement: M_t writes y' as the supporter's next turn, guided by its reflection and its draft y.

The dialogue stays as chat turns and the principles, reflection and draft go into the system message: asked in
prose to "rewrite the reply", a small model drifts into commentary about the conversation; answering as the
supporter's next turn keeps it in role.
"""

from __future__ import annotations

from collections.abc import Sequence

from esc_evolve.data.prompts import build_messages
from esc_evolve.data.schema import Turn
from esc_evolve.evolve.principles import Principles
from esc_evolve.evolve.reflection import Reflection, reflection_summary


def refinement_system(base_system: str, principles: Principles, reflection: Reflection, draft: str | None) -> str:
    """The system message of a refined reply. Without a draft (`None`), the same prompt guides a first reply with
    what is known about the person (serving's profile memory)."""
    noticed = f"{base_system}\n\n{principles.guidelines_text()}\n\n"
    noticed += f"What you noticed about this person:\n{reflection_summary(reflection, principles)}\n\n"
    if draft is None:
        return noticed + "Now write your reply to them: one that fits what you noticed, in your own words."
    return (
        f'{noticed}Your first draft was: "{draft}"\n'
        "Now write your reply to them: one that fits what you noticed, in your own words, without repeating "
        "the draft."
    )


def plain_refinement_system(base_system: str, draft: str) -> str:
    """Self-refinement alone (evolve.reflection: none): improve the draft, with no reflection and no principles."""
    return (
        f'{base_system}\n\nYour first draft reply was: "{draft}"\n'
        "Now write an improved reply to them, in your own words, without repeating the draft."
    )


def refinement_messages(
    context: Sequence[Turn], base_system: str, principles: Principles, reflection: Reflection, draft: str
) -> list[dict[str, str]]:
    return build_messages(context, refinement_system(base_system, principles, reflection, draft))
