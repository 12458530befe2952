"""Helpers for tests/test_generation.py: the tiny model as an engine, a LoRA adapter for it, a loopback server.

All text here is written for the tests (no corpus text).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from esc_evolve.config import GenerationSettings, ModelSettings
from esc_evolve.generation import GenerationRequest, prefill

SYSTEM = "You are a kind listener. Answer in one or two short sentences."
USER_LINES = [
    "I failed my driving test again today.",
    "My sister has stopped answering my calls and I do not know what I did wrong.",
    "hi",
    "Work has been so busy that I have not slept properly in weeks, and now I keep forgetting small things, "
    "which makes me even more anxious about losing my job.",
    "I moved to a new city and I do not know anyone here yet.",
    "Everything feels heavy lately.",
]


def chat(user: str, turns: int = 0, system: str | None = SYSTEM) -> list[dict[str, str]]:
    """A chat with `turns` earlier (user, assistant) exchanges before the final user message."""
    messages = [{"role": "system", "content": system}] if system else []
    for i in range(turns):
        messages += [
            {"role": "user", "content": f"Earlier message number {i} about my week and how it went."},
            {"role": "assistant", "content": f"Thank you for telling me about part {i}. How did it feel?"},
        ]
    return [*messages, {"role": "user", "content": user}]


def varied_requests(max_new_tokens: int = 12) -> list[GenerationRequest]:
    """Prompts of very different lengths (a few tokens of history up to ~350 tokens)."""
    turns = [0, 6, 0, 2, 1, 0]
    return [
        GenerationRequest(messages=chat(line, t), max_new_tokens=max_new_tokens, id=f"r{i}")
        for i, (line, t) in enumerate(zip(USER_LINES, turns, strict=True))
    ]


def tiny_model_config(model_dir: Path) -> ModelSettings:
    return ModelSettings(name=str(model_dir), device="cpu", dtype="float32")


def make_engine(model: Any, tokenizer: Any, **kwargs: Any) -> Any:
    from esc_evolve.generation.hf import TransformersGenerator

    batch_size = kwargs.pop("batch_size", 4)
    config = GenerationSettings(batch_size=batch_size, max_new_tokens=kwargs.pop("max_new_tokens", 12))
    return TransformersGenerator(model, tokenizer, config, **kwargs)


def naive_tokens(model: Any, tokenizer: Any, request: GenerationRequest, eos_ids: list[int]) -> list[int]:
    """Greedy ids from a plain `model.generate` on the prompt alone, up to and including the first EOS."""
    import torch

    from esc_evolve.data.prompts import render_prompt

    ids = tokenizer(render_prompt(tokenizer, list(request.messages or [])), add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids], device=model.device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=request.max_new_tokens,
        do_sample=False,
        eos_token_id=eos_ids,
        pad_token_id=eos_ids[0],
    )[0, len(ids) :].tolist()
    end = next((i + 1 for i, t in enumerate(out) if t in eos_ids), len(out))
    return out[:end]


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter with random (non-zero) weights, so that it visibly changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(out)
    return out


class _Handler(BaseHTTPRequestHandler):
    """Canned OpenAI-style answers; records what it was sent. A chat reply is `chat_answer(body)` (default: an
    echo of the last message).

    Hooks set on the server: `delay(body) -> seconds` before answering, `reject(body) -> bool` answers 400;
    `max_in_flight` counts the requests answered at once, `answered` the bodies in the order answered."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        self.server.seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        server = self.server
        with server.lock:
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            time.sleep(server.delay(body))
            self._answer(body)
        finally:
            with server.lock:
                server.in_flight -= 1
                server.answered.append(body)

    def _answer(self, body: dict[str, Any]) -> None:
        if self.server.reject(body):
            self._send(400, {"error": "prompt too long"})
            return
        if self.server.fail_next > 0:
            self.server.fail_next -= 1
            self._send(503, {"error": "busy"})
            return
        if self.path.endswith("/chat/completions"):
            content = self.server.chat_answer(body)
            choice = {"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        elif self.path.endswith("/completions"):
            choice = {"text": f"echo: {body['prompt']} END more", "finish_reason": "length"}
        else:
            self._send(404, {"error": "no such route"})
            return
        if body.get("stop") == ["STOPME"]:
            choice.update(finish_reason="stop", stop_reason="STOPME")
        self._send(200, {"choices": [choice], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass


@contextmanager
def loopback_server(chat_answer: Callable[[dict[str, Any]], str] | None = None) -> Iterator[Any]:
    """An OpenAI-compatible stub on 127.0.0.1 (an OS-chosen port), stopped on exit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.chat_answer = chat_answer or (lambda body: f"echo: {body['messages'][-1]['content']}")
    server.seen = []
    server.fail_next = 0
    server.delay, server.reject = (lambda _body: 0.0), (lambda _body: False)
    server.lock, server.in_flight, server.max_in_flight, server.answered = threading.Lock(), 0, 0, []
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        server.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def computed_tokens(monkeypatch: Any) -> list[int]:
    """Record how many prompt tokens each one-row prefill forward computes."""
    counts: list[int] = []
    forward = prefill._forward

    def counting(model, cache_name, ids, start, upto=None):
        counts.append(len(ids))
        return forward(model, cache_name, ids, start, upto)

    monkeypatch.setattr(prefill, "_forward", counting)
    return counts
