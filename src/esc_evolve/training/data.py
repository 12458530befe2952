"""SFT datasets: ESC turn samples (and optional replay data) as trl prompt/completion conversations.

Each row is `{"prompt": [system, user, assistant, ..., user], "completion": [assistant]}`. trl tokenizes the
prompt alone (with the generation prompt) and prompt + completion, and with `completion_only_loss` puts every
token of the shared prefix (system prompt, context, `<|im_start|>assistant\\n`) at label -100. The completion
tokens, including the closing `<|im_end|>`, are learned. Padding is added by the collator with label -100 (by
position, not by token id), so `<|im_end|>` being also the pad token does not mask it. In the dataset trl gets
(`trl_dataset`) every row carries `chat_template_kwargs` (`MESSAGES_AS_TEXT`), which trl passes on when it
tokenises the row: a control-token spelling inside a message is learned as text, as the generators encode it.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esc_evolve.config import DataSettings, ModelSettings, SFTSettings
from esc_evolve.data import TurnSample, build_turn_samples, load_split, load_train
from esc_evolve.data.prompts import MESSAGES_AS_TEXT, build_messages, encode_prompt
from esc_evolve.errors import ConfigError, DataFormatError
from esc_evolve.models import load_tokenizer

log = logging.getLogger(__name__)

Row = dict[str, list[dict[str, str]]]

# Field names of the common instruction-data layouts, in order of preference.
PROMPT_KEYS = ("prompt", "instruction", "question", "query")
RESPONSE_KEYS = ("response", "completion", "output", "answer", "chosen")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class SFTRows:
    """The training mix and the held-out slice, as plain rows (turned into `datasets.Dataset` by the trainer)."""

    train: list[Row]
    eval: list[Row]
    counts: dict[str, Any]


def sample_to_row(sample: TurnSample, system_prompt: str | None) -> Row:
    return {
        "prompt": build_messages(sample.context, system_prompt),
        "completion": [{"role": "assistant", "content": sample.response}],
    }


def build_sft_rows(settings: SFTSettings, data: DataSettings, model: ModelSettings, seed: int) -> SFTRows:
    """ESC samples of `data.train_path` (+ replay at `settings.replay_ratio`), and the eval slice.

    The eval slice is `data.valid_path` when set, else `settings.eval_fraction` of the training conversations
    (split by conversation, so no dialogue is in both). Both are capped at random, with the run seed.
    """
    conversations = list(load_train(data).conversations)
    heldout: list = []
    if data.valid_path:
        heldout = load_split(data.valid_path, data).conversations
    elif settings.eval_fraction > 0:
        random.Random(seed).shuffle(conversations)
        n_eval = max(1, round(len(conversations) * settings.eval_fraction))
        heldout, conversations = conversations[:n_eval], conversations[n_eval:]
    to_rows = [sample_to_row(s, data.system_prompt) for s in build_turn_samples(conversations, data.context_window)]
    eval_rows = [sample_to_row(s, data.system_prompt) for s in build_turn_samples(heldout, data.context_window)]
    eval_rows = _subset(eval_rows, settings.max_eval_samples, seed)
    train_rows, counts = mix_replay(to_rows, settings, seed)
    tokenizer = load_tokenizer(model)
    counts["shortened_contexts"] = sum(fit_to_length(row, tokenizer, settings.max_length) for row in train_rows)
    for row in eval_rows:
        fit_to_length(row, tokenizer, settings.max_length)
    counts["eval_samples"] = len(eval_rows)
    counts["eval_source"] = data.valid_path or f"{settings.eval_fraction:.0%} of {data.train_path}"
    log.info("SFT data: %s", counts)
    return SFTRows(train=train_rows, eval=eval_rows, counts=counts)


def fit_to_length(row: Row, tokenizer: Any, max_length: int) -> bool:
    """Drop the oldest context turns until prompt + response fit `max_length` tokens; True if any were dropped.

    trl truncates from the end, which would cut the response (and its `<|im_end|>`) or drop the sample when the
    context alone is too long; the oldest turns matter least to the reply. The system prompt and the last turn
    always stay, and the prompt keeps starting with a user turn, as chat templates expect.
    """
    shortened = False
    while _length(row, tokenizer) > max_length:
        first = 1 if row["prompt"][0]["role"] == "system" else 0
        turns = row["prompt"][first:]
        if len(turns) <= 1:
            break  # one turn and the reply are still too long: trl truncates the reply
        drop = 1
        while drop < len(turns) - 1 and turns[drop]["role"] != "user":
            drop += 1
        row["prompt"] = row["prompt"][:first] + turns[drop:]
        shortened = True
    return shortened


def _length(row: Row, tokenizer: Any) -> int:
    return len(encode_prompt(tokenizer, row["prompt"] + row["completion"], add_generation_prompt=False))


def trl_dataset(rows: list[dict[str, Any]]) -> Any:
    """Conversational rows as the `datasets.Dataset` trl trains on. trl hands a row's `chat_template_kwargs` to
    `apply_chat_template` when it tokenises the row (SFT and DPO alike), so message text is encoded as text."""
    from datasets import Dataset

    return Dataset.from_list([{**row, "chat_template_kwargs": dict(MESSAGES_AS_TEXT)} for row in rows])


def mix_replay(esc_rows: list[Row], sft: SFTSettings, seed: int) -> tuple[list[Row], dict[str, Any]]:
    """Cap the mix at `sft.max_train_samples` and give `sft.replay_ratio` of it to replay rows.

    Replay rows are drawn without replacement while they last, then cycled (logged), so the ratio holds.
    """
    ratio = sft.replay_ratio if sft.replay_path else 0.0
    if ratio >= 1.0:
        raise ConfigError("sft.replay_ratio must be below 1 (it is the replay share of the training mix)")
    if sft.replay_ratio > 0 and not sft.replay_path:
        log.warning("sft.replay_ratio=%s but sft.replay_path is not set: no replay data", sft.replay_ratio)
    total = len(esc_rows) / (1 - ratio)
    if sft.max_train_samples is not None:
        total = min(total, sft.max_train_samples)
    n_replay = round(total * ratio)
    esc = _subset(esc_rows, round(total) - n_replay, seed)
    replay = _draw(load_replay(sft.replay_path), n_replay, seed) if n_replay else []
    rows = esc + replay
    random.Random(seed + 1).shuffle(rows)
    return rows, {"train_samples": len(rows), "esc_samples": len(esc), "replay_samples": len(replay)}


def load_replay(path: str | Path) -> list[Row]:
    """Chat-format JSON lines: `{"messages": [...]}` (ShareGPT `conversations` too) or prompt/response pairs.

    A conversation is learned on its last assistant message; earlier turns are the prompt.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"sft.replay_path: file not found: {file}")
    rows = []
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(replay_row(json.loads(line)))
            except (ValueError, TypeError, KeyError) as exc:
                raise DataFormatError(f"{file}:{number}: not a replay record: {exc}") from None
    if not rows:
        raise DataFormatError(f"{file}: no replay records")
    return rows


def replay_row(record: dict[str, Any]) -> Row:
    if "messages" in record or "conversations" in record:
        messages = [_message(m) for m in record.get("messages") or record["conversations"]]
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise ValueError("a conversation needs at least one turn before a final assistant message")
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    prompt = next((record[k] for k in PROMPT_KEYS if k in record), None)
    response = next((record[k] for k in RESPONSE_KEYS if k in record), None)
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(f"expected 'messages' or one of {PROMPT_KEYS} with one of {RESPONSE_KEYS} (strings)")
    if isinstance(record.get("input"), str) and record["input"].strip():  # Alpaca: instruction + input
        prompt = f"{prompt}\n\n{record['input']}"
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return {
        "prompt": [*messages, {"role": "user", "content": prompt}],
        "completion": [{"role": "assistant", "content": response}],
    }


def _message(message: dict[str, Any]) -> dict[str, str]:
    role = message.get("role", message.get("from"))
    content = message.get("content", message.get("value"))
    if role not in SHAREGPT_ROLES or not isinstance(content, str):
        raise ValueError(f"bad message {str(message)[:80]!r}: needs a known role and string content")
    return {"role": SHAREGPT_ROLES[role], "content": content}


def _subset(rows: list[Row], n: int | None, seed: int) -> list[Row]:
    """A seeded random subset (turn samples of one conversation are adjacent: the first N would be few dialogues)."""
    if n is None or n >= len(rows):
        return list(rows)
    return random.Random(seed).sample(rows, n)


def _draw(rows: list[Row], n: int, seed: int) -> list[Row]:
    if n > len(rows):
        log.info("replay: %d rows for %d slots: cycling through them", len(rows), n)
    order = list(rows)
    random.Random(seed).shuffle(order)
    return [order[i % len(order)] for i in range(n)]
