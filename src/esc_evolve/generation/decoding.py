"""Per-row hooks into transformers' `generate`: stop strings, budgets, cancellation, sampling and streaming per row.

`generate` decodes a whole batch with one set of settings. These hooks let each row keep its own:
- `RowStopper` ends a row when its reply contains one of its stop strings, reaches its own token budget or is
  cancelled by its caller; `generate` then pads that row while the others go on.
- `TopPFilter`: transformers' top-p filter without sorting the whole vocabulary at every step.
- `SeededSampler` turns greedy decoding into sampling with a private random stream per row (Gumbel-max:
  argmax(log p + Gumbel noise) is a draw from p). A row's noise depends only on its request's seed, so a sampled
  reply does not depend on which other requests share its batch, unlike `torch.multinomial` on the global RNG.
- `RowStreamer` hands each row's new text to a callback as it is decoded. transformers' own streamers take one
  row only (they raise on a batch), so this one is written here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

log = logging.getLogger(__name__)


class RowStopper(StoppingCriteria):
    """Stop row i at `budgets[i]` new tokens, when its reply contains one of `stops[i]`, or when `cancelled(i)`
    (its caller went away: the row stops costing anything while the rest of the batch goes on)."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_width: int,
        budgets: Sequence[int],
        stops: Sequence[Sequence[str]],
        cancelled: Callable[[int], bool] | None = None,
    ):
        self.tokenizer = tokenizer
        self.cancelled = cancelled
        self.prompt_width = prompt_width
        self.budgets = torch.tensor(list(budgets))
        self.stops = [tuple(s) for s in stops]
        # A stop string of n characters lies within the last n + 1 tokens (a token decodes to >= 1 character;
        # a few more for byte-level tokens that hold part of a multi-byte character).
        self.tail = [max((len(s) for s in row), default=0) + 4 for row in self.stops]
        self.stopped_at: dict[int, int] = {}  # row -> new tokens when its stop string appeared
        self.cancelled_at: dict[int, int] = {}  # row -> new tokens when its caller cancelled it

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        produced = input_ids.shape[1] - self.prompt_width
        done = self.budgets.to(input_ids.device) <= produced
        for row, stops in enumerate(self.stops):
            if not stops or row in self.stopped_at:
                continue
            tail = input_ids[row, max(self.prompt_width, input_ids.shape[1] - self.tail[row]) :]
            text = self.tokenizer.decode(tail, skip_special_tokens=False)
            if any(stop in text for stop in stops):
                self.stopped_at[row] = produced
        for row in self.stopped_at:
            done[row] = True
        if self.cancelled is not None:
            for row in range(len(self.stops)):
                if row not in self.cancelled_at and self.cancelled(row):
                    self.cancelled_at[row] = produced
            for row in self.cancelled_at:
                done[row] = True
        return done


class TopPFilter(LogitsProcessor):
    """Nucleus filtering as transformers' `TopPLogitsWarper` (keep the most probable tokens until their mass
    reaches `top_p`, at least one; the rest get -inf), found among the `candidates` most probable tokens instead
    of by sorting the whole vocabulary: on a CPU that sort cost ~4 ms a row a decoding step for a 49k vocabulary
    (144 ms a step at 34 rows), more than SmolLM2-135M's own forward for those rows in bf16. A row whose
    candidates hold less than `top_p` of the mass falls back to the full sort. The kept set is the warper's but
    where the warper's float32 sum rounds across `top_p` (1 row in ~1000 on random logits; the sums here are
    float64, so the kept set is the exact nucleus), and for tokens tied with the least probable kept one (all
    kept here; the warper's sort decides)."""

    def __init__(self, top_p: float, candidates: int = 1024):
        from transformers import TopPLogitsWarper

        self.top_p = top_p
        self.candidates = candidates
        self.full = TopPLogitsWarper(top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        top = scores.topk(min(self.candidates, scores.shape[-1]), dim=-1).values  # descending
        # In float64, so that the boundary is the exact one (the warper's float32 sums err by ~1e-7 near top_p).
        probs = (top.double() - scores.double().logsumexp(dim=-1, keepdim=True)).exp()
        before = probs.cumsum(dim=-1) - probs  # the mass of the tokens more probable than each candidate
        kept = (before < self.top_p).sum(dim=-1, keepdim=True).clamp_(min=1)
        cutoff = top.gather(-1, kept - 1)  # the least probable kept logit
        filtered = scores.masked_fill(scores < cutoff, float("-inf"))
        short = (before[:, -1] + probs[:, -1]) < self.top_p  # the candidates hold too little: the whole sort
        if short.any():
            filtered[short] = self.full(input_ids[short], scores[short])
        return filtered


class SeededSampler(LogitsProcessor):
    """Sample row i from softmax(scores[i]) with its own `torch.Generator` (Gumbel-max trick).

    Put it last, after temperature / top-p warpers, and run `generate` greedily: the argmax of the noisy scores
    is the sample. Rows with `None` as generator stay greedy.
    """

    def __init__(self, seeds: Sequence[int | None]):
        self.generators = [None if s is None else torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, generator in enumerate(self.generators):
            if generator is None:
                continue
            # -log(E), E ~ Exp(1), is Gumbel(0, 1). Drawn on CPU so that the stream is the same on every device.
            exp = torch.empty(scores.shape[-1], dtype=torch.float32).exponential_(generator=generator)
            gumbel = -exp.clamp_(min=1e-30).log_()
            scores[row] = scores[row] + gumbel.to(scores.device, scores.dtype)
        return scores


class RowStreamer(BaseStreamer):
    """Pass each row's new reply text to `on_text(row, piece)` as `generate` decodes it, batch or not.

    A row's text is decoded from all its new tokens so far and released but for its end that a later token can
    still change: an unfinished multi-byte character and trailing whitespace. Text that could be the start of one
    of the row's stop strings is held back too. A row ends at an end-of-sequence token,
    its budget or a stop string. `finish(row, text)` releases the rest of the row's final text (the engine's
    result), so the pieces of a row always add up to its result's text.
    """

    def __init__(
        self,
        tokenizer: Any,
        budgets: Sequence[int],
        stops: Sequence[Sequence[str]],
        eos_ids: Sequence[int],
        on_text: Callable[[int, str], None],
    ):
        self.tokenizer = tokenizer
        self.budgets = list(budgets)
        self.stops = [tuple(s) for s in stops]
        self.keep = [max((len(s) for s in row), default=1) - 1 for row in self.stops]
        self.eos = set(eos_ids)
        self.on_text = on_text
        self.tokens: list[list[int]] = [[] for _ in self.budgets]
        self.ended = [False] * len(self.budgets)
        self.sent = [""] * len(self.budgets)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first puts the prompt ids: not reply text
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.ended[row]:
                continue
            if token in self.eos:
                self.ended[row] = True
                continue
            self.tokens[row].append(token)
            self.ended[row] = len(self.tokens[row]) >= self.budgets[row]
            self._release(row)

    def end(self) -> None:
        """Called by generate when it is done; what is left is released by `finish` with the final text."""

    def finish(self, row: int, text: str) -> None:
        """Release the rest of the row's final `text` (once the whole reply is known)."""
        sent = self.sent[row]
        if not text.startswith(sent):  # the hold-backs above should prevent it; the final text is what is stored
            log.warning("a streamed reply differs from its final text after %d characters", len(sent))
        rest = text[len(sent) :] if text.startswith(sent) else ""
        self.sent[row] = text
        self.ended[row] = True
        if rest:
            self.on_text(row, rest)

    def _release(self, row: int) -> None:
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stops[row]) if i >= 0]
        if hits:  # the reply ends before its stop string
            text, self.ended[row] = text[: min(hits)], True
        else:
            text = text[: len(text) - self.keep[row]] if self.keep[row] else text
            # The end may still change: a character split across tokens decodes as U+FFFD until it is whole, and a
            # tokenizer's clean-up removes a space before punctuation ("hi ." -> "hi.") once that arrives.
            text = text.rstrip("\ufffd").rstrip()
        if len(text) > len(self.sent[row]) and text.startswith(self.sent[row]):
            piece, self.sent[row] = text[len(self.sent[row]) :], text
            self.on_text(row, piece)
