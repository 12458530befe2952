"""Filling a batch's KV cache before `generate` decodes it.

The cache is laid out like `batching.layout`: row b holds the shared prefix in columns [0, P) and the rest of
its prompt right-aligned; padding columns are zeros and masked. Both functions leave the last prompt column to
`generate`, which needs at least one uncached token per row to produce the first logits.

- `prefix_cache`: only the shared prefix, computed once and copied into every row; `generate` prefills the rest
  as one padded batch (efficient on GPUs, where a batch is needed to fill the device).
- `row_prefilled_cache`: also each row's own tokens, computed one row at a time without padding. On a CPU a
  single prompt already has enough rows to run matmuls at full speed, so the padding a batched prefill computes
  is pure waste: on 32 ESConv prompts (200-600 tokens), 25% of the cells of length-sorted batches of 16.
  (Keys and values match those of the prompt run alone to ~1e-5, not bitwise: sgemm rounds a product of n-1
  rows slightly differently from one of n rows.)
- `PromptStore`: with `row_prefilled_cache`, each row's prompt and reply kept from one generate call to the next,
  for callers whose next prompts extend this call's (dialogues that advance a turn per call: `simulate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def prefix_cache(model: Any, cache_name: str, prefix: Sequence[int], rows: int, max_len: int, static: bool) -> Any:
    """A cache holding the shared `prefix` in every one of `rows` rows."""
    cache = _new_cache(model, max_len, static)
    shared = _forward(model, cache_name, prefix, None)
    positions = torch.arange(len(prefix), device=model.device)
    for index, layer in enumerate(shared.layers):
        keys = layer.keys.expand(rows, -1, -1, -1).contiguous()
        values = layer.values.expand(rows, -1, -1, -1).contiguous()
        cache.update(keys, values, index, {"cache_position": positions})
    return cache


def row_prefilled_cache(
    model: Any,
    cache_name: str,
    rows: Sequence[Sequence[int]],
    prefix: int,
    width: int,
    max_len: int,
    static: bool,
    reuse_min: int = 0,
    store: PromptStore | None = None,
) -> Any | None:
    """A cache holding every row's prompt but its last token (None when no row has more than one token).

    With `reuse_min` > 0, a row that shares at least `reuse_min` tokens (beyond the batch's common prefix) with
    another row of the batch starts from that row's keys and values and computes only the rest: the reflection
    fields of one context quote the same dialogue and differ only in their question. Rows are visited in the
    order of their tokens, so the row sharing the longest prefix with a row is always the one visited just
    before it (a property of sorted sequences), and only that row's cache is kept (the idea of vLLM's prefix
    caching and SGLang's radix tree, within one batch). With a `store`, a row may also start from a sequence of the
    previous call that it extends (the engine keeps each decoded row there: `PromptStore.keep_row`).
    """
    if width <= 1:
        return None
    shared = None  # the batch's common prefix, computed when a row first starts from it (not all may, with a store)
    cache = None
    previous: tuple[Sequence[int], Any] | None = None
    for row_index in sorted(range(len(rows)), key=lambda i: list(rows[i])):
        row = rows[row_index]
        start, start_len = None, prefix
        if reuse_min and previous is not None:
            common = _common(previous[0], row, len(row) - 1)
            if common - prefix >= reuse_min:
                start, start_len = previous[1], common
        if store is not None:
            start, start_len = store.take(row, start, start_len)
        if start is None and prefix:
            shared = shared if shared is not None else _forward(model, cache_name, rows[0][:prefix], None)
            start = shared
        rest = row[start_len:-1]
        own = _forward(model, cache_name, rest, start, start_len) if rest else start
        if own is None:
            continue  # a one-token prompt: generate computes it
        previous = (row[:-1], own)
        if cache is None:
            cache = _allocated(model, own, len(rows), width - 1, max_len, static)
        for target, source in zip(cache.layers, own.layers, strict=True):
            for dst, src in ((target.keys, source.keys), (target.values, source.values)):
                dst[row_index, :, :prefix] = src[0, :, :prefix]
                dst[row_index, :, width - len(row) + prefix : width - 1] = src[0, :, prefix : len(row) - 1]
    return cache


class PromptStore:
    """Each dialogue's keys and values kept from one generate call to the next: its prompt and the reply generated
    to it, taken from the batch's cache once decoded (`keep_row`). A row of the next call that extends a kept
    sequence by at least `min_tokens` tokens starts from it and computes only the rest (in a dialogue, the next
    turn's prompt is this one, the reply and the other side's message; the common prefix is found token by token,
    so a reply the caller cut or re-encoded differently is reused as far as it matches). Keys and values
    computed in pieces match those computed at once to rounding, as with the within-batch reuse above.
    Memory: one call's dialogues (~46 KB a token in fp32 for the 135M backbone); a kept sequence serves one row
    and is dropped as it does, the rest at the next call.
    """

    def __init__(self, min_tokens: int = 16) -> None:
        self.min_tokens = min_tokens
        self.previous: list[tuple[np.ndarray, Any]] = []  # the last call's sequences (ids, one-row cache)
        self.current: list[tuple[np.ndarray, Any]] = []

    def next_call(self) -> None:
        """A new generate call: what the last one kept becomes what this one may start from."""
        self.previous, self.current = self.current, []

    def take(self, row: Sequence[int], start: Any, start_len: int) -> tuple[Any, int]:
        """The longest start for `row`: (`start`, `start_len`) or a kept sequence that shares more of it."""
        ids = np.asarray(row[:-1])
        best, best_len = None, start_len + self.min_tokens - 1
        for index, (kept, _) in enumerate(self.previous):
            common = _common_np(kept, ids)
            if common > best_len:
                best, best_len = index, common
        if best is None:
            return start, start_len
        return self.previous.pop(best)[1], best_len

    def keep_row(
        self, model: Any, cache: Any, row: int, prompt: Sequence[int], reply: Sequence[int], prefix: int, width: int
    ) -> None:
        """Keep row `row` of a decoded batch cache (laid out as in the module docstring): its `prompt` and the
        first len(`reply`) generated tokens, whose keys and values the decoding steps wrote from column `width`
        on (the last generated token has none: pass at most steps - 1)."""
        from transformers import DynamicCache

        own = torch.arange(width - len(prompt) + prefix, width + len(reply))
        columns = torch.cat([torch.arange(prefix), own]).to(model.device)
        kept = DynamicCache(config=model.config)
        for index, layer in enumerate(cache.layers):
            keys = layer.keys[row : row + 1].index_select(2, columns)
            kept.update(keys, layer.values[row : row + 1].index_select(2, columns), index)
        self.current.append((np.asarray([*prompt, *reply]), kept))


def _common_np(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two id arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _common(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of `a` and `b`, at most `limit`."""
    n = 0
    for x, y in zip(a[:limit], b[:limit], strict=False):
        if x != y:
            break
        n += 1
    return n


def _forward(model: Any, cache_name: str, ids: Sequence[int], start: Any | None, upto: int | None = None) -> Any:
    """Run `ids` (one row, no padding) after the first `upto` positions (default: all) of the cache `start`
    (left untouched); return the new cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if start is not None:
        for index, layer in enumerate(start.layers):
            # The forward below concatenates onto these views into new tensors: `start` stays as it was.
            cache.update(layer.keys[:, :, :upto], layer.values[:, :, :upto], index)
    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{cache_name: cache})
    return cache


def _allocated(model: Any, like: Any, rows: int, length: int, max_len: int, static: bool) -> Any:
    """A cache whose first `length` columns exist (zeros) in every row, shaped after the one-row cache `like`."""
    cache = _new_cache(model, max_len, static)
    positions = torch.arange(length, device=model.device)
    for index, layer in enumerate(like.layers):
        zeros = layer.keys.new_zeros((rows, layer.keys.shape[1], length, layer.keys.shape[3]))
        zeros_v = layer.values.new_zeros((rows, layer.values.shape[1], length, layer.values.shape[3]))
        cache.update(zeros, zeros_v, index, {"cache_position": positions})
    return cache


def _new_cache(model: Any, max_len: int, static: bool) -> Any:
    from transformers import DynamicCache, StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len) if static else DynamicCache(config=model.config)
