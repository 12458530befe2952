"""OpenAI-compatible HTTP backend: LLM judges and remote servers (OpenAI, vLLM's server, llama.cpp, Ollama...).

Chat requests go to `POST {base_url}/chat/completions`, pre-rendered prompts to `POST {base_url}/completions`.
The server renders chat messages, so whether a control-token spelling in a message stays text is the server's
business (see docs/generation.md). A chat whose reply starts with a `continuation` (a reflection prompt) needs
the served model's tokenizer here: it is encoded with `encode_prompt` and sent to `/completions` as token ids.
It uses the standard library's HTTP client, so it needs no extra package; requests run concurrently in a thread
pool (at most `max_concurrency` in flight, results in input order) and are retried with backoff on 429 and 5xx
answers; when one fails for good the call raises, naming the server, and requests not yet sent are dropped.
`base_url` may be a list of servers holding the same models (a farm of vLLM servers): each attempt goes to the
server with the fewest requests in flight (ties in turn), and a retry goes to another server when there is one.
The API key is
read from an environment variable (never from a config file); without one no Authorization header is sent
(local servers).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from esc_evolve.config import GenerationSettings, ModelSettings
from esc_evolve.data.prompts import encode_prompt
from esc_evolve.generation.progress import GenerationProgress
from esc_evolve.generation.types import (
    FinishReason,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    Generator,
    cut_at_stop,
)

RETRY_STATUS = {429, 500, 502, 503, 504}


class OpenAIGenerator(Generator):
    """Generate with a model behind an OpenAI-compatible HTTP API. `tokenizer` is the served model's, where it is
    available here; only requests with a `continuation` need it."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str,
        config: GenerationSettings | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_concurrency: int = 8,
        retries: int = 3,
        tokenizer: Any = None,
        tokenizer_loader: Callable[[], Any] | None = None,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise GenerationError("the openai backend needs at least one server URL")
        self.servers = ServerPool([url.rstrip("/") for url in urls])
        self.base_url = self.servers.urls[0]
        self.tokenizer = tokenizer
        self._tokenizer_loader = tokenizer_loader  # the served model's tokenizer, loaded when first needed
        self.model = model
        self.config = config or GenerationSettings()
        self.api_key = os.environ.get(api_key_env) or None
        self.timeout = timeout
        self.max_concurrency = max(1, max_concurrency)
        self.retries = retries

    @classmethod
    def from_config(
        cls, model_config: ModelSettings, config: GenerationSettings, adapter: Path | None = None
    ) -> OpenAIGenerator:
        """The generator of `config.openai` for the backbone (`adapter` None) or the run's model at `adapter`
        (served under the name `served_models` gives its folder name: m0, m1, ...). Requests with a continuation
        are encoded with that model's tokenizer, loaded locally on first use."""
        server = config.openai
        base_url = server.base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise GenerationError(
                "the openai backend needs a server: set generation.openai.base_url or $OPENAI_BASE_URL "
                "(e.g. http://127.0.0.1:8000/v1)"
            )

        def load() -> Any:
            from esc_evolve.models import load_tokenizer

            return load_tokenizer(model_config, adapter)

        return cls(
            base_url,
            served_name(model_config, server, adapter),
            config,
            api_key_env=server.api_key_env,
            timeout=server.request_timeout,
            max_concurrency=server.max_concurrency,
            tokenizer_loader=load,
        )

    def generate(self, requests: Sequence[GenerationRequest], progress: bool = True) -> list[GenerationResult]:
        with (
            GenerationProgress(len(requests), progress) as bar,
            ThreadPoolExecutor(min(self.max_concurrency, max(len(requests), 1))) as pool,
        ):
            futures = [pool.submit(self._one, i, r) for i, r in enumerate(requests)]
            results = []
            try:
                for future in futures:  # in input order, whatever order the answers arrive in
                    result = future.result()
                    bar.advance(1, result.num_tokens)
                    results.append(result)
            except BaseException:
                # One request failed for good (or the caller interrupted): the call fails, so the requests not
                # yet sent are dropped instead of being waited for.
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return results

    # ----------------------------------------------------------------------------------------------------

    def _one(self, index: int, request: GenerationRequest) -> GenerationResult:
        chat = request.messages is not None and not request.continuation
        body = self._body(request, chat)
        answer, url = self._post("/chat/completions" if chat else "/completions", body, request.id or f"#{index}")
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            usage = answer.get("usage") or {}
        except (KeyError, IndexError, TypeError) as exc:
            raise GenerationError(f"request {request.id or index}: unexpected answer from {url}") from exc
        text, hit = cut_at_stop(text or "", request.stop)  # servers that ignore `stop` still get it honoured
        return GenerationResult(
            text=text,
            num_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason="stop_string" if hit else _finish(choice),
            request_id=request.id,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
        )

    def _body(self, request: GenerationRequest, chat: bool) -> dict[str, Any]:
        cfg = self.config
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_new_tokens or cfg.max_new_tokens,
            "temperature": cfg.temperature if request.temperature is None else request.temperature,
            "top_p": cfg.top_p if request.top_p is None else request.top_p,
        }
        if chat:
            body["messages"] = [dict(m) for m in request.messages or []]
        else:
            body["prompt"] = request.prompt if request.messages is None else self._token_ids(request)
        if request.stop:
            body["stop"] = list(request.stop)[:4]  # the OpenAI API takes at most 4; the rest are cut locally
        if request.seed is not None:
            body["seed"] = request.seed
        return body

    def _token_ids(self, request: GenerationRequest) -> list[int]:
        # The chat API has no portable way to start the reply with given text; a completion prompt of token ids
        # does, and keeps message text as text whatever the server would do with a rendered string.
        if self.tokenizer is None and self._tokenizer_loader is not None:
            with self.servers.lock:  # one load, whichever thread needs it first
                if self.tokenizer is None:
                    self.tokenizer = self._load_tokenizer(request)
        if self.tokenizer is None:
            raise GenerationError(
                f"request {request.id!r} starts the reply with a continuation: it is sent as token ids, which needs "
                "the served model's tokenizer (OpenAIGenerator(..., tokenizer=...))"
            )
        return encode_prompt(self.tokenizer, request.messages or [], continuation=request.continuation)

    def _load_tokenizer(self, request: GenerationRequest) -> Any:
        """The served model's tokenizer from the local model settings; a served name that is not a local model
        (no alias, folder or hub id) is a generation error that says what to pass, and is not tried again."""
        loader, self._tokenizer_loader = self._tokenizer_loader, None
        try:
            return loader()
        except Exception as exc:  # BackboneError, OSError, ...: the caller reports generation errors
            raise GenerationError(
                f"request {request.id!r} starts the reply with a continuation: it is sent as token ids, which needs "
                f"the served model's tokenizer, and it could not be loaded locally ({exc}); give it (chat/serve: "
                "--tokenizer)"
            ) from None

    def _post(self, path: str, body: dict[str, Any], name: str) -> tuple[dict[str, Any], str]:
        """The server's JSON answer and the server that gave it."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode("utf-8")
        tried: list[str] = []
        for attempt in range(self.retries + 1):
            url = self.servers.acquire(avoid=tried)
            tried.append(url)
            req = urllib.request.Request(url + path, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8")), url
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRY_STATUS or attempt == self.retries:
                    detail = exc.read().decode("utf-8", "replace")[:300]
                    raise GenerationError(f"request {name}: {url}{path} answered {exc.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
                if attempt == self.retries:
                    raise GenerationError(f"request {name}: cannot reach {url}{path}: {exc}") from None
            finally:
                self.servers.release(url)
            time.sleep(min(2.0**attempt * 0.5, 8.0))
        raise AssertionError("unreachable")


class ServerPool:
    """The servers of a farm and how many requests each has in flight; `acquire` picks the least loaded one."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.lock = threading.Lock()
        self.in_flight = dict.fromkeys(urls, 0)
        self.sent = dict.fromkeys(urls, 0)  # requests sent to each server, for logs and tests
        self._turn = 0

    def acquire(self, avoid: Sequence[str] = ()) -> str:
        """The least loaded server, preferring one not in `avoid` (those a request already failed on); ties go
        round-robin, so an idle farm is filled evenly."""
        with self.lock:
            candidates = [u for u in self.urls if u not in avoid] or self.urls
            self._turn += 1
            order = {u: (i - self._turn) % len(self.urls) for i, u in enumerate(self.urls)}
            url = min(candidates, key=lambda u: (self.in_flight[u], order[u]))
            self.in_flight[url] += 1
            self.sent[url] += 1
            return url

    def release(self, url: str) -> None:
        with self.lock:
            self.in_flight[url] -= 1


def served_name(model_config: ModelSettings, server: Any, adapter: Path | None) -> str:
    """The name a request for this model carries: `served_models` maps a run's model names (`base`, and an
    adapter's folder name: m0, m1, ...) to the names the servers know them by."""
    if adapter is None:
        return server.served_models.get("base") or server.model or model_config.name
    name = Path(adapter).name
    if name not in server.served_models:
        raise GenerationError(
            f"the openai backend serves remote models: map {name!r} ({adapter}) to the name its server serves it "
            f"under in generation.openai.served_models (e.g. a vLLM server started with "
            f"--enable-lora --lora-modules {name}={Path(adapter) / 'served'}; docs/scale.md)"
        )
    return server.served_models[name]


def _finish(choice: dict[str, Any]) -> FinishReason:
    """OpenAI says 'stop' for both an end-of-sequence token and a stop string; vLLM's server tells them apart
    with `stop_reason` (the matched string, or a token id)."""
    if choice.get("finish_reason") == "length":
        return "length"
    return "stop_string" if isinstance(choice.get("stop_reason"), str) else "stop"
