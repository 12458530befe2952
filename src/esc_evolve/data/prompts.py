"""Chat messages for a dialogue context, rendered and encoded with the backbone's own chat template.

The seeker is the `user`, the supporter the `assistant`. Seeker text is data: it is placed in a user
message verbatim and never interpreted as an instruction to the pipeline. That holds for the tokens too:
`encode_prompt` encodes a control-token spelling inside a message ("<|im_start|>system") as the characters
it is made of, so only the chat template itself opens and closes turns (see docs/generation.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from esc_evolve.data.schema import Turn

ROLE_OF = {"seeker": "user", "supporter": "assistant"}

# transformers' switch for encoding control-token spellings inside messages as plain text, while the template's
# own control tokens stay control tokens (the version is pinned in pyproject.toml: older ones ignore the keyword).
# A chat without such spellings encodes as it would without it. Passed by `encode_prompt` and, per training row,
# to trl's tokenisation (training/data.py).
MESSAGES_AS_TEXT: dict[str, Any] = {"sanitize_control_tokens": True}

Messages = Sequence[dict[str, str]]
T = TypeVar("T")


def build_messages(context: Sequence[Turn], system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": ROLE_OF[turn.speaker], "content": turn.text} for turn in context]
    return messages


def render_prompt(tokenizer: Any, messages: Messages, add_generation_prompt: bool = True) -> str:
    """The chat as text, for reading (what a model sees is `encode_prompt`'s ids). For templates without a
    system role (e.g. early Mistral), the system message is folded into the first user message."""
    return _folding_system(
        lambda chat: tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt),
        messages,
    )


def encode_prompt(
    tokenizer: Any, messages: Messages, *, add_generation_prompt: bool = True, continuation: str = ""
) -> list[int]:
    """The chat's token ids, every message's text encoded as text (see `MESSAGES_AS_TEXT`).

    `continuation` is pipeline text the assistant's reply starts with (a reflection field's prefix): the prompt
    ends with it, after the assistant header, as `render_prompt(...) + continuation` would read. A system message
    is folded into the first user message for templates without a system role, as in `render_prompt`.
    """
    options: dict[str, Any] = {"add_generation_prompt": add_generation_prompt}
    if continuation:
        if not add_generation_prompt:
            raise ValueError("a continuation starts the assistant's reply: it needs add_generation_prompt=True")
        # transformers' prefill: the template renders the reply so far as the last assistant message, left open
        messages = [*messages, {"role": "assistant", "content": continuation}]
        options = {"continue_final_message": True}
    return _folding_system(
        lambda chat: list(
            tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False, **options, **MESSAGES_AS_TEXT)
        ),
        messages,
    )


def _folding_system(apply: Callable[[list[dict[str, str]]], T], messages: Messages) -> T:
    """`apply(messages)`; if the template rejects them and they start with a system message, `apply` again with
    the system text folded into the first message."""
    messages = list(messages)
    try:
        return apply(messages)
    except Exception:
        if not messages or messages[0]["role"] != "system" or len(messages) < 2:
            raise
        system, first, *rest = messages
        return apply([{"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}, *rest])
