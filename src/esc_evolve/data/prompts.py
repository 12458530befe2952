"""Chat messages for a dialogue context, rendered with the backbone's own chat template.

The seeker is the `user`, the supporter the `assistant`. Seeker text is data: it is placed in a user
message verbatim and never interpreted as an instruction to the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from esc_evolve.data.schema import Turn

ROLE_OF = {"seeker": "user", "supporter": "assistant"}


def build_messages(context: Sequence[Turn], system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": ROLE_OF[turn.speaker], "content": turn.text} for turn in context]
    return messages


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Apply the tokenizer's chat template; for templates without a system role (e.g. early Mistral),
    fold the system message into the first user message."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception:
        if not messages or messages[0]["role"] != "system" or len(messages) < 2:
            raise
        system, first, *rest = messages
        folded = {"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}
        return tokenizer.apply_chat_template(
            [folded, *rest], tokenize=False, add_generation_prompt=add_generation_prompt
        )
