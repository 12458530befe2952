"""The transformers backend (default; CPU and GPU): batched `model.generate` with per-request settings.

What makes it fast (measured on a 2-core CPU with SmolLM2-135M, see benchmarks/README.md):
- requests sorted by prompt length into batches, decoded together with a KV cache;
- prompts prefilled one row at a time on CPU (no padding computed; see prefill.py), decoding batched;
- the prompt prefix that a batch shares (the system message) computed once and copied into every row;
- a static KV cache: the default dynamic cache concatenates every layer's keys and values at every step,
  ~16% of a decode step at batch 32;
- torch.inference_mode, and a merged LoRA adapter (no per-layer adapter matmuls) when one is loaded;
- for dialogues (`tune(reuse_prompts=True)`, used by `simulate`): each row's prompt and reply keys and values
  kept until the next call, whose prompts extend them (prefill.PromptStore).

Greedy replies are the same as those of the same prompt generated alone: padding is masked and position ids
come from the mask, so each row sees its own tokens at its own positions. Logits are not bit-identical: the
BLAS picks a different matmul kernel for one row than for many, which moves fp32 results by ~1e-6 relative;
a token changes only where the two best candidates are that close (see docs/generation.md).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from esc_evolve.config import GenerationSettings
from esc_evolve.data.prompts import encode_prompt
from esc_evolve.generation.batching import Prepared, common_prefix, layout, plan_batches
from esc_evolve.generation.decoding import RowStopper, RowStreamer, SeededSampler, TopPFilter
from esc_evolve.generation.prefill import PromptStore, prefix_cache, row_prefilled_cache
from esc_evolve.generation.progress import GenerationProgress
from esc_evolve.generation.types import GenerationError, GenerationRequest, GenerationResult, Generator, cut_at_stop

log = logging.getLogger(__name__)


class TransformersGenerator(Generator):
    """Generate with a loaded transformers model (optionally a peft model) and its tokenizer.

    `share_prefix_min` is the shortest shared prompt prefix worth computing once per batch (0 disables it);
    `row_prefill` computes prompts one row at a time, without padding (default: on CPU, see prefill.py);
    `static_cache` (default: on CPU) pre-allocates the KV cache instead of transformers' dynamic cache. `seed`
    seeds sampled requests that carry no seed of their own (request i of a call gets `seed + i`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: GenerationSettings | None = None,
        *,
        seed: int = 0,
        max_context: int | None = None,
        truncate_context: bool = True,
        static_cache: bool | None = None,
        share_prefix_min: int = 16,
        row_prefill: bool | None = None,
        max_batch_tokens: int = 65536,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or GenerationSettings()
        self.seed = seed
        self.max_context = max_context or _context_length(model, tokenizer)
        self.truncate_context = truncate_context
        # On a CPU the static cache saves re-concatenating every layer's keys and values at each step; on a GPU
        # that copy is cheap and the dynamic cache avoids allocating for the longest row (measured on an H100).
        self.static_cache = model.device.type == "cpu" if static_cache is None else static_cache
        self.share_prefix_min = share_prefix_min
        self.row_prefill = model.device.type == "cpu" if row_prefill is None else row_prefill
        self.max_batch_tokens = max_batch_tokens
        self.eos_ids = _eos_ids(model, tokenizer)
        self.cache_kwarg = cache_kwarg(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.prompt_store: PromptStore | None = None

    # ----------------------------------------------------------------------------------------------------
    # Public API

    def tune(self, *, batch_size: int | None = None, reuse_prompts: bool | None = None) -> None:
        if batch_size is not None:
            self.config = self.config.model_copy(update={"batch_size": batch_size})
        if reuse_prompts is not None:
            # Only the row-by-row prefill (CPU) can start a row from a kept prompt; a fresh store either way, so
            # that what one caller's dialogues left behind never reaches another's.
            self.prompt_store = (
                PromptStore(max(self.share_prefix_min, 1)) if reuse_prompts and self.row_prefill else None
            )

    def generate(self, requests: Sequence[GenerationRequest], progress: bool = True) -> list[GenerationResult]:
        prepared = [self._prepare(i, r) for i, r in enumerate(requests)]
        results: list[GenerationResult | None] = [None] * len(prepared)
        if self.prompt_store is not None:
            self.prompt_store.next_call()
        with GenerationProgress(len(prepared), progress) as bar, torch.inference_mode():
            for batch in plan_batches(prepared, self.config.batch_size, self.max_batch_tokens):
                done = self._run_batch(batch)
                for item, result in zip(batch, done, strict=True):
                    results[item.index] = result
                bar.advance(len(batch), sum(r.num_tokens for r in done))
        return [r for r in results if r is not None]

    def generate_stream(
        self,
        requests: Sequence[GenerationRequest],
        on_text: Callable[[int, str], None],
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[GenerationResult]:
        """`generate`, with each request's reply passed to `on_text(i, piece)` while its batch decodes (see
        decoding.RowStreamer); a request for which `cancelled(i)` turns true stops generating."""
        prepared = [self._prepare(i, r) for i, r in enumerate(requests)]
        results: list[GenerationResult | None] = [None] * len(prepared)
        if self.prompt_store is not None:
            self.prompt_store.next_call()
        with torch.inference_mode():
            for batch in plan_batches(prepared, self.config.batch_size, self.max_batch_tokens):
                streamer = RowStreamer(
                    self.tokenizer,
                    [item.max_new_tokens for item in batch],
                    [item.stops for item in batch],
                    self.eos_ids,
                    lambda row, piece, batch=batch: on_text(batch[row].index, piece),
                )
                stop = (lambda row, batch=batch: cancelled(batch[row].index)) if cancelled else None
                done = self._run_batch(batch, streamer=streamer, cancelled=stop)
                for row, (item, result) in enumerate(zip(batch, done, strict=True)):
                    streamer.finish(row, result.text)
                    results[item.index] = result
        return [r for r in results if r is not None]

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        item = self._prepare(0, request)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode():
                    self._run_batch([item], streamer=streamer)
            except BaseException as exc:  # re-raised in the caller's thread below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from _until_stop(streamer, item.stops)
        finally:
            thread.join()
        if failure:
            raise failure[0]

    # ----------------------------------------------------------------------------------------------------
    # Preparation: defaults, tokenisation, context length

    def _prepare(self, index: int, request: GenerationRequest) -> Prepared:
        cfg = self.config
        name = request.id or f"#{index}"
        max_new = request.max_new_tokens or cfg.max_new_tokens
        temperature = cfg.temperature if request.temperature is None else request.temperature
        top_p = cfg.top_p if request.top_p is None else request.top_p
        seed = None if temperature <= 0 else (request.seed if request.seed is not None else self.seed + index)
        ids, dropped = self._fit(name, request, max_new)
        return Prepared(index, request.id, tuple(ids), max_new, temperature, top_p, tuple(request.stop), seed, dropped)

    def _fit(self, name: str, request: GenerationRequest, max_new: int) -> tuple[list[int], int]:
        """Token ids of the prompt; for chat messages, drop the oldest turns (never the system message) until
        prompt + max_new_tokens fits the model's context. A pre-rendered prompt that does not fit is an error."""
        if request.prompt is not None:
            ids = self._encode_text(request.prompt)
            self._check_fits(name, len(ids), max_new, hint="shorten the prompt or lower max_new_tokens")
            return ids, 0
        messages = list(request.messages or [])
        dropped = 0
        while True:
            ids = encode_prompt(self.tokenizer, messages, continuation=request.continuation)
            if len(ids) + max_new <= self.max_context or not self.truncate_context:
                break
            head = 1 if messages and messages[0]["role"] == "system" else 0
            if len(messages) - head <= 1:
                break
            del messages[head]  # the oldest turn; a chat must start with the user, so an assistant turn goes too
            dropped += 1
            while len(messages) - head > 1 and messages[head]["role"] != "user":
                del messages[head]
                dropped += 1
        self._check_fits(name, len(ids), max_new, hint="even its last message alone is too long")
        return ids, dropped

    def _check_fits(self, name: str, prompt_tokens: int, max_new: int, hint: str) -> None:
        if prompt_tokens + max_new > self.max_context:
            raise GenerationError(
                f"request {name}: {prompt_tokens} prompt tokens + {max_new} new tokens exceed the model's "
                f"context of {self.max_context} tokens ({hint})"
            )

    def _encode_text(self, text: str) -> list[int]:
        # A pre-rendered prompt is the caller's text, control tokens and all; it gets the tokenizer's usual special
        # tokens (e.g. BOS) unless it already starts with them.
        bos = self.tokenizer.bos_token
        special = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    # ----------------------------------------------------------------------------------------------------
    # One batch

    def _run_batch(
        self, batch: list[Prepared], streamer: Any = None, cancelled: Callable[[int], bool] | None = None
    ) -> list[GenerationResult]:
        rows = [item.ids for item in batch]
        prefix = common_prefix(rows)
        prefix = prefix if self.share_prefix_min and prefix >= self.share_prefix_min else 0
        input_ids, mask = layout(rows, prefix)
        width = input_ids.shape[1]
        max_new = max(item.max_new_tokens for item in batch)
        log.debug("batch of %d rows: width %d, shared prefix %d, %d new tokens", len(rows), width, prefix, max_new)
        budgets, stops = [i.max_new_tokens for i in batch], [i.stops for i in batch]
        stopper = RowStopper(self.tokenizer, width, budgets, stops, cancelled)
        device = self.model.device
        kwargs: dict[str, Any] = {
            "input_ids": input_ids.to(device),
            "attention_mask": mask.to(device),
            "generation_config": self._generation_config(max_new),
            "logits_processor": self._processors(batch),
            "stopping_criteria": _criteria_list(stopper),
            "streamer": streamer,
        }
        cache = self._cache(rows, prefix, width, width + max_new)
        if cache is not None:
            kwargs[self.cache_kwarg] = cache
        sequences = self.model.generate(**kwargs)
        results = [self._result(item, sequences[row, width:].tolist(), stopper, row) for row, item in enumerate(batch)]
        if self.prompt_store is not None and cache is not None:
            self._keep(batch, results, cache, prefix, width, sequences.shape[1] - width)
        return results

    def _keep(
        self, batch: list[Prepared], results: list[GenerationResult], cache: Any, prefix: int, width: int, steps: int
    ) -> None:
        """Each row's prompt and reply into the prompt store, for the next call's prompts that extend them. The
        cache holds keys and values for all but the batch's last generated token (`steps` - 1 per row)."""
        assert self.prompt_store is not None
        for row, (item, result) in enumerate(zip(batch, results, strict=True)):
            reply = result.token_ids[: max(0, min(result.num_tokens, steps - 1))]
            self.prompt_store.keep_row(self.model, cache, row, item.ids, reply, prefix, width)

    def _generation_config(self, max_new: int) -> Any:
        from transformers import GenerationConfig as HFGenerationConfig

        # Always greedy inside generate: sampling, where asked, is done per row by SeededSampler.
        return HFGenerationConfig(
            max_new_tokens=max_new,
            do_sample=False,
            num_beams=1,
            repetition_penalty=self.config.repetition_penalty,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            # transformers compiles the forward pass when it sees a static cache on a GPU; every batch here has
            # its own cache length, so each one recompiled (on an H100 that made the engine slower than a naive
            # loop: 36 vs 57 tok/s). Compilation pays off only for fixed shapes, which batching by length is not.
            disable_compile=True,
        )

    def _processors(self, batch: list[Prepared]) -> Any:
        from transformers import LogitsProcessorList, TemperatureLogitsWarper

        processors = LogitsProcessorList()
        temperature, top_p = batch[0].sampling_key
        if batch[0].seed is None:
            return processors
        processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            processors.append(TopPFilter(top_p))
        processors.append(SeededSampler([item.seed for item in batch]))
        return processors

    def _cache(self, rows: list[tuple[int, ...]], prefix: int, width: int, max_len: int) -> Any:
        """The batch's KV cache, filled as far as `generate` should not (None: let generate make its own)."""
        if self.row_prefill:
            return row_prefilled_cache(
                self.model,
                self.cache_kwarg,
                rows,
                prefix,
                width,
                max_len,
                self.static_cache,
                reuse_min=self.share_prefix_min,
                store=self.prompt_store,
            )
        if prefix:
            return prefix_cache(self.model, self.cache_kwarg, rows[0][:prefix], len(rows), max_len, self.static_cache)
        if self.static_cache:
            from transformers import StaticCache

            return StaticCache(config=self.model.config, max_cache_len=max_len)
        return None

    def _result(self, item: Prepared, tokens: list[int], stopper: RowStopper, row: int) -> GenerationResult:
        # A cancelled row ends where it was cancelled, reported as cut short ("length"): its caller is gone.
        ends = {"length": min(item.max_new_tokens, len(tokens), stopper.cancelled_at.get(row, len(tokens)))}
        eos = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        if eos is not None:
            ends["stop"] = eos + 1
        if row in stopper.stopped_at:
            ends["stop_string"] = stopper.stopped_at[row]
        reason = min(ends, key=lambda k: (ends[k], k != "stop"))  # an EOS that is also the last token wins
        count = ends[reason]
        shown = tokens[: count - 1] if reason == "stop" else tokens[:count]  # the EOS token is never text
        text = self.tokenizer.decode(shown, skip_special_tokens=True)
        text, hit = cut_at_stop(text, item.stops)
        return GenerationResult(
            text=text,
            num_tokens=count,
            finish_reason="stop_string" if hit else reason,  # type: ignore[arg-type]
            request_id=item.request_id,
            prompt_tokens=len(item.ids),
            dropped_turns=item.dropped_turns,
            token_ids=tuple(tokens[:count]),
        )


# ---------------------------------------------------------------------------------------------------------
# Helpers


def cache_kwarg(model: Any) -> str:
    """transformers 5 names the cache argument `cache`; 4.x called it `past_key_values`."""
    import inspect

    forward = getattr(model, "get_base_model", lambda: model)().forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _criteria_list(stopper: RowStopper) -> Any:
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList([stopper])


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the model's generation config (which lists end-of-turn tokens) and the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in [*ids, tokenizer.eos_token_id] if i is not None]
    if not ids:
        raise GenerationError("the model and tokenizer define no end-of-sequence token")
    return list(dict.fromkeys(ids))


def _context_length(model: Any, tokenizer: Any) -> int:
    length = getattr(model.config, "max_position_embeddings", None)
    if length is None:
        limit = getattr(tokenizer, "model_max_length", None)
        length = limit if limit and limit < 1_000_000 else 4096
    return int(length)


def _until_stop(chunks: Iterator[str], stops: Sequence[str]) -> Iterator[str]:
    """Pass text through, holding back just enough to never emit the start of a stop string, and end before
    the first stop string."""
    if not stops:
        yield from chunks
        return
    keep = max(len(s) for s in stops) - 1
    text, sent = "", 0
    for chunk in chunks:
        text += chunk
        cut, hit = cut_at_stop(text, stops)
        if hit:
            if len(cut) > sent:
                yield cut[sent:]
            return
        safe = len(text) - keep
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    if len(text) > sent:
        yield text[sent:]
