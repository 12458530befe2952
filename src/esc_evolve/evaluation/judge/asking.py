"""Asking a judge many prompts: in chunks, with each failure narrowed down to the prompt that caused it.

A chunk whose `ask` raises (or answers a wrong number of texts) is split in halves and each half asked again,
down to single prompts: every error is recorded against its own prompt, while the prompts that work stay
batched (a local model batches them like any generation, a server answers them concurrently).
"""

from __future__ import annotations

from collections.abc import Sequence

from esc_evolve.evaluation.judge.base import Judge, Messages
from esc_evolve.evaluation.judge.parsing import JudgeRecord
from esc_evolve.evaluation.judge.prompts import JudgeCall

BATCH_CHUNK = 256  # prompts per `ask` call by default: bounds memory and keeps progress visible

Answer = tuple[str, str | None]  # (text, None) or ("", error)


def judge_calls(judge: Judge, calls: Sequence[JudgeCall], chunk_size: int | None = None) -> list[JudgeRecord]:
    """A record per call, in order."""
    answers = ask_judge(judge, [c.messages for c in calls], chunk_size)
    return [call.record(raw, error) for call, (raw, error) in zip(calls, answers, strict=True)]


def ask_judge(judge: Judge, prompts: Sequence[Messages], chunk_size: int | None = None) -> list[Answer]:
    """(answer, None) or ("", error) per prompt, in order. Chunks of `chunk_size`, else the judge's own
    `chunk_size`, else `BATCH_CHUNK` prompts."""
    size = chunk_size or judge.chunk_size or BATCH_CHUNK
    answers: list[Answer] = []
    for start in range(0, len(prompts), max(1, size)):
        answers += _ask_chunk(judge, list(prompts[start : start + size]))
    return answers


def _ask_chunk(judge: Judge, prompts: list[Messages]) -> list[Answer]:
    try:
        texts = judge.ask(prompts)
        if len(texts) != len(prompts):
            raise ValueError(f"the judge answered {len(texts)} texts for {len(prompts)} prompts")
    except Exception as exc:  # a backend may fail in many ways (too long, timeouts, HTTP errors)
        if len(prompts) == 1:
            return [("", f"{type(exc).__name__}: {exc}")]
        half = len(prompts) // 2  # which prompt failed is unknown: halve until each error has its own prompt
        return _ask_chunk(judge, prompts[:half]) + _ask_chunk(judge, prompts[half:])
    return [(text if isinstance(text, str) else str(text), None) for text in texts]
