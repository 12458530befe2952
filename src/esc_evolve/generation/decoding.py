"""Per-row hooks into transformers' `generate`: stop strings and budgets per request, seeded sampling per request.

`generate` decodes a whole batch with one set of settings. These two hooks let each row keep its own:
- `RowStopper` ends a row when its reply contains one of its stop strings or reaches its own token budget;
  `generate` then pads that row while the others go on.
- `SeededSampler` turns greedy decoding into sampling with a private random stream per row (Gumbel-max:
  argmax(log p + Gumbel noise) is a draw from p). A row's noise depends only on its request's seed, so a sampled
  reply does not depend on which other requests share its batch, unlike `torch.multinomial` on the global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria


class RowStopper(StoppingCriteria):
    """Stop row i at `budgets[i]` new tokens, or when its reply contains one of `stops[i]`."""

    def __init__(self, tokenizer: Any, prompt_width: int, budgets: Sequence[int], stops: Sequence[Sequence[str]]):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.budgets = torch.tensor(list(budgets))
        self.stops = [tuple(s) for s in stops]
        # A stop string of n characters lies within the last n + 1 tokens (a token decodes to >= 1 character;
        # a few more for byte-level tokens that hold part of a multi-byte character).
        self.tail = [max((len(s) for s in row), default=0) + 4 for row in self.stops]
        self.stopped_at: dict[int, int] = {}  # row -> new tokens when its stop string appeared

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
        return done


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
