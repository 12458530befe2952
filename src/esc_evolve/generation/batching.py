"""Pure planning for the transformers backend: which requests share a batch and how a batch is laid out.

Layout of one batch (T = columns): every row is `[shared prefix | padding | rest of its prompt]`, the rest
right-aligned so that all rows produce their next token in the same column. Without a shared prefix this is
plain left padding. Padding columns are masked out and position ids come from the mask, so a row sees exactly
its own tokens at positions 0..n-1, as it would alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Prepared:
    """A request after tokenisation and defaults: what the engine needs to run it."""

    index: int  # position in the caller's list: results go back there
    request_id: str | None
    ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float
    top_p: float
    stops: tuple[str, ...]
    seed: int | None  # None = greedy
    dropped_turns: int = 0

    @property
    def name(self) -> str:
        """How error messages name the request."""
        return self.request_id or f"#{self.index}"

    @property
    def sampling_key(self) -> tuple[float, float]:
        """Rows of one batch share temperature and top-p (transformers' warpers take one value per batch)."""
        return (self.temperature, self.top_p) if self.seed is not None else (0.0, 1.0)


def plan_batches(items: Sequence[Prepared], batch_size: int, max_batch_tokens: int) -> Iterator[list[Prepared]]:
    """Group by sampling settings, sort each group by prompt length (longest first, so that padding is small and
    a batch too big for memory shows up at once), and cut it into batches of at most `batch_size` rows and
    `max_batch_tokens` cells of (prompt + new tokens)."""
    groups: dict[tuple[float, float], list[Prepared]] = {}
    for item in items:
        groups.setdefault(item.sampling_key, []).append(item)
    for group in groups.values():
        group.sort(key=lambda p: (-len(p.ids), p.index))
        batch: list[Prepared] = []
        for item in group:
            width = max(len(item.ids), *(len(p.ids) for p in batch)) if batch else len(item.ids)
            new = max(item.max_new_tokens, *(p.max_new_tokens for p in batch)) if batch else item.max_new_tokens
            if batch and (len(batch) >= batch_size or (len(batch) + 1) * (width + new) > max_batch_tokens):
                yield batch
                batch = []
            batch.append(item)
        if batch:
            yield batch


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every row, leaving each row at least one token of its own
    (generate needs one uncached token per row to produce the first logits)."""
    if len(rows) < 2:
        return 0
    shortest = min(len(r) for r in rows) - 1
    first = rows[0]
    n = 0
    while n < shortest and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def layout(rows: Sequence[Sequence[int]], prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask for `[prefix | padding | rest]` rows (see the module docstring).

    Padding cells hold the row's own first token rather than the pad token: they are masked, but a repetition
    penalty counts every token id of the row, and a foreign pad id (often the end-of-sequence id) would be
    penalised in padded rows only, making a reply depend on its batch.
    """
    width = max(len(r) for r in rows)
    ids = torch.empty((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i] = row[0]
        ids[i, :prefix] = torch.tensor(row[:prefix], dtype=torch.long)
        mask[i, :prefix] = 1
        rest = row[prefix:]
        ids[i, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
        mask[i, width - len(rest) :] = 1
    return ids, mask
