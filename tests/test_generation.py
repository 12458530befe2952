"""Generation engine: batching equals generating alone, per-row stops, adapters, seeds, context limits, backends."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from esc_evolve.config import GenerationSettings, ModelSettings
from esc_evolve.generation import (
    GenerationError,
    GenerationRequest,
    GenerationResult,
    Generator,
    build_generator,
    load_for_generation,
)
from esc_evolve.generation.batching import Prepared, common_prefix, layout, plan_batches
from esc_evolve.generation.openai_backend import OpenAIGenerator
from tests.generation_fixtures import (
    SYSTEM,
    chat,
    loopback_server,
    make_adapter,
    make_engine,
    naive_tokens,
    tiny_model_config,
    varied_requests,
)


@pytest.fixture(scope="module")
def tiny(varied_model_dir: Path):
    """(model, tokenizer) of the tiny random Llama whose replies depend on the prompt, loaded once for the module."""
    return load_for_generation(tiny_model_config(varied_model_dir))


# ---------------------------------------------------------------------------------------------------------
# Batching, padding, KV cache: a batch gives what each prompt gives alone


ENGINE_PATHS = pytest.mark.parametrize(
    "settings",
    [
        {},
        {"row_prefill": False},
        {"row_prefill": False, "static_cache": False, "share_prefix_min": 0},
        {"static_cache": False},
        {"share_prefix_min": 0},
    ],
    ids=["defaults", "batched-prefill", "plain-generate", "row-prefill-dynamic-cache", "row-prefill-no-prefix"],
)


@ENGINE_PATHS
def test_batched_greedy_equals_each_prompt_alone(tiny, settings) -> None:
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer, batch_size=4, **settings)
    requests = varied_requests(max_new_tokens=16)
    lengths = [len(engine._prepare(i, r).ids) for i, r in enumerate(requests)]
    assert max(lengths) > 4 * min(lengths)  # very different lengths, so rows carry a lot of padding

    batched = engine.generate(requests, progress=False)
    for request, result in zip(requests, batched, strict=True):
        alone = engine.generate([request], progress=False)[0]
        assert result.token_ids == alone.token_ids, request.id
        assert list(result.token_ids) == naive_tokens(model, tokenizer, request, engine.eos_ids), request.id
        assert result.text == alone.text


@ENGINE_PATHS
def test_a_broken_attention_mask_would_be_seen(tiny, settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test above can fail: the model says something different for each prompt, and a mask that lets rows
    see their padding changes what padded rows say, on every path of the engine."""
    import esc_evolve.generation.hf as hf

    model, tokenizer = tiny
    engine = make_engine(model, tokenizer, batch_size=4, **settings)
    requests = varied_requests(max_new_tokens=8)
    alone = [engine.generate([r], progress=False)[0].token_ids for r in requests]
    assert len(set(alone)) == len(requests)  # a reply depends on its prompt

    def unmasked(rows, prefix):
        ids, mask = layout(rows, prefix)
        return ids, torch.ones_like(mask)

    monkeypatch.setattr(hf, "layout", unmasked)
    broken = [r.token_ids for r in engine.generate(requests, progress=False)]
    assert broken != alone


def test_results_come_back_in_input_order(tiny) -> None:
    model, tokenizer = tiny
    requests = varied_requests(max_new_tokens=3)[::-1]  # batching sorts by length; the caller must not notice
    results = make_engine(model, tokenizer, batch_size=2).generate(requests, progress=False)
    assert [r.request_id for r in results] == [r.id for r in requests]
    assert all(r.num_tokens == 3 and r.finish_reason == "length" for r in results)


def test_each_request_keeps_its_own_token_budget(tiny) -> None:
    model, tokenizer = tiny
    requests = [
        GenerationRequest(messages=chat(line), max_new_tokens=n, id=str(n))
        for line, n in zip(["hi", "hello there", "good evening"], [2, 9, 5], strict=True)
    ]
    results = make_engine(model, tokenizer).generate(requests, progress=False)
    assert [r.num_tokens for r in results] == [2, 9, 5]
    assert {r.finish_reason for r in results} == {"length"}


def test_stop_strings_end_each_sequence_independently(tiny) -> None:
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer, max_new_tokens=16)
    plain = engine.generate(varied_requests(16)[:3], progress=False)
    # A stop string that request 0 produces mid-way (the text of its 6th token); the others keep theirs.
    stop = tokenizer.decode(list(plain[0].token_ids[5:6])).strip() or tokenizer.decode(list(plain[0].token_ids[5:7]))
    requests = varied_requests(16)[:3]
    requests[0] = GenerationRequest(messages=requests[0].messages, max_new_tokens=16, stop=(stop,), id="r0")
    stopped = engine.generate(requests, progress=False)

    assert stopped[0].finish_reason == "stop_string"
    assert stop not in stopped[0].text and plain[0].text.startswith(stopped[0].text)
    assert stopped[0].num_tokens <= 7
    assert [r.token_ids for r in stopped[1:]] == [r.token_ids for r in plain[1:]]  # the others ran on


def test_end_of_sequence_ends_a_row_and_is_not_in_the_text(tiny) -> None:
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer, max_new_tokens=8)
    requests = varied_requests(8)[:2]
    first = engine.generate(requests, progress=False)
    engine.eos_ids = [*engine.eos_ids, first[0].token_ids[2]]  # make request 0's third token an end token
    ended = engine.generate(requests, progress=False)
    assert ended[0].finish_reason == "stop" and ended[0].num_tokens <= 3
    assert ended[0].text == tokenizer.decode(list(first[0].token_ids[: ended[0].num_tokens - 1]))
    assert ended[1].num_tokens == 8 or ended[1].finish_reason == "stop"


def test_stream_yields_the_same_text_and_honours_stops(tiny) -> None:
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer, max_new_tokens=12)
    request = varied_requests(12)[1]
    full = engine.generate([request], progress=False)[0]
    assert "".join(engine.stream(request)) == full.text
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = GenerationRequest(messages=request.messages, max_new_tokens=12, stop=(stop,))
    assert "".join(engine.stream(cut)) == full.text[: full.text.index(stop)]


# ---------------------------------------------------------------------------------------------------------
# Seeds


def test_greedy_and_seeded_sampling_are_deterministic(tiny) -> None:
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer, max_new_tokens=10)
    greedy = varied_requests(10)
    assert engine.generate(greedy, progress=False) == engine.generate(greedy, progress=False)

    def sampled(seed: int, i: int = 1) -> GenerationRequest:
        return GenerationRequest(messages=chat(f"tell me something, {i}"), temperature=1.0, top_p=0.9, seed=seed)

    once = engine.generate([sampled(7), sampled(8)], progress=False)
    again = engine.generate([sampled(7), sampled(8)], progress=False)
    assert once == again
    assert once[0].token_ids != once[1].token_ids  # different seeds, different draws
    greedy_same_prompt = GenerationRequest(messages=sampled(7).messages)
    assert once[0].token_ids != engine.generate([greedy_same_prompt], progress=False)[0].token_ids


def test_a_sampled_reply_does_not_depend_on_its_batch(tiny) -> None:
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer, max_new_tokens=10, batch_size=8)
    target = GenerationRequest(messages=chat("I feel stuck."), temperature=0.8, seed=123)
    others = [GenerationRequest(messages=chat(f"other {i}", i), temperature=0.8, seed=i) for i in range(5)]
    alone = engine.generate([target], progress=False)[0]
    crowded = engine.generate([*others[:2], target, *others[2:]], progress=False)[2]
    assert alone.token_ids == crowded.token_ids


def test_unseeded_sampling_follows_the_generator_seed(tiny) -> None:
    model, tokenizer = tiny
    request = GenerationRequest(messages=chat("Say anything."), temperature=1.0)
    first = make_engine(model, tokenizer, seed=5).generate([request], progress=False)
    assert make_engine(model, tokenizer, seed=5).generate([request], progress=False) == first
    assert make_engine(model, tokenizer, seed=6).generate([request], progress=False) != first


# ---------------------------------------------------------------------------------------------------------
# Context length


def test_too_long_prompt_is_an_error_naming_the_request(tiny) -> None:
    model, tokenizer = tiny  # the tiny model's context is 512 tokens
    engine = make_engine(model, tokenizer)
    long_prompt = "word " * 600
    with pytest.raises(GenerationError, match=r"request big-one: \d+ prompt tokens \+ 12 new tokens exceed .* 512"):
        engine.generate([GenerationRequest(prompt="short"), GenerationRequest(prompt=long_prompt, id="big-one")])
    with pytest.raises(GenerationError, match="request #0"):
        engine.generate([GenerationRequest(messages=chat(long_prompt))], progress=False)


def test_long_chat_drops_its_oldest_turns_and_keeps_the_system_message(tiny) -> None:
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer)
    request = GenerationRequest(messages=chat("And today?", turns=20), max_new_tokens=12)
    result = engine.generate([request], progress=False)[0]
    assert result.dropped_turns > 0 and result.dropped_turns % 2 == 0  # whole (user, assistant) exchanges
    assert result.prompt_tokens + 12 <= 512
    kept = engine._prepare(0, request)
    rendered = tokenizer.decode(list(kept.ids))
    assert SYSTEM in rendered and "And today?" in rendered and "number 0 " not in rendered
    strict = make_engine(model, tokenizer, truncate_context=False)
    with pytest.raises(GenerationError, match="exceed the model's context"):
        strict.generate([request], progress=False)


# ---------------------------------------------------------------------------------------------------------
# Adapters


def test_adapter_changes_outputs_and_merged_equals_unmerged(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    config = tiny_model_config(tiny_model_dir)
    requests = varied_requests(10)[:4]
    outputs = {}
    for name, kwargs in {"base": {}, "merged": {"merge": True}, "unmerged": {"merge": False}}.items():
        model, tokenizer = load_for_generation(config, adapter if kwargs else None, **kwargs)
        outputs[name] = [r.token_ids for r in make_engine(model, tokenizer).generate(requests, progress=False)]
    assert outputs["merged"] != outputs["base"]
    assert outputs["merged"] == outputs["unmerged"]


def test_build_generator_applies_an_adapter_and_rejects_other_folders(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    generator = build_generator(tiny_model_config(tiny_model_dir), GenerationSettings(max_new_tokens=4), adapter)
    assert generator.generate([GenerationRequest(messages=chat("hi"))], progress=False)[0].num_tokens == 4
    with pytest.raises(GenerationError, match="not a peft adapter folder"):
        build_generator(tiny_model_config(tiny_model_dir), GenerationSettings(), tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Planning (pure functions)


def _item(index: int, length: int, temperature: float = 0.0, new: int = 8) -> Prepared:
    seed = index if temperature > 0 else None
    return Prepared(index, None, tuple(range(length)), new, temperature, 1.0, (), seed)


def test_plan_batches_groups_sampling_settings_and_sorts_by_length() -> None:
    items = [_item(0, 5), _item(1, 50), _item(2, 20, temperature=0.7), _item(3, 30), _item(4, 10)]
    batches = [[p.index for p in b] for b in plan_batches(items, batch_size=2, max_batch_tokens=10_000)]
    assert batches == [[1, 3], [4, 0], [2]]
    # the token budget splits a batch before the row count does
    assert [len(b) for b in plan_batches([_item(i, 100) for i in range(4)], 4, max_batch_tokens=250)] == [2, 2]


def test_layout_puts_the_shared_prefix_first_and_right_aligns_the_rest() -> None:
    rows = [(7, 8, 9, 1, 2, 3), (7, 8, 9, 4)]
    assert common_prefix(rows) == 3
    assert common_prefix([(7, 8), (7, 8)]) == 1  # each row keeps one token of its own
    ids, mask = layout(rows, prefix=3)
    assert ids.tolist() == [[7, 8, 9, 1, 2, 3], [7, 8, 9, 7, 7, 4]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 1]]
    ids, mask = layout(rows, prefix=0)
    assert mask.tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1]]


# ---------------------------------------------------------------------------------------------------------
# Other backends


def test_openai_backend_against_a_loopback_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESC_TEST_KEY", "sk-test")
    with loopback_server() as server:
        generator = OpenAIGenerator(
            server.base_url, "judge", GenerationSettings(max_new_tokens=5), api_key_env="ESC_TEST_KEY", timeout=5
        )
        requests = [GenerationRequest(messages=chat(f"message {i}"), id=f"c{i}", seed=i) for i in range(6)]
        requests.append(GenerationRequest(prompt="raw prompt", stop=("END",), id="p"))
        requests.append(GenerationRequest(messages=chat("stop here"), stop=("STOPME",), id="s"))
        results = generator.generate(requests, progress=False)

    assert [r.request_id for r in results] == [r.id for r in requests]
    assert [r.text for r in results[:6]] == [f"echo: message {i}" for i in range(6)]
    assert results[0].finish_reason == "stop" and results[0].num_tokens == 3 and results[0].prompt_tokens == 7
    assert results[6].text == "echo: raw prompt " and results[6].finish_reason == "stop_string"
    assert results[7].finish_reason == "stop_string"
    first = next(s for s in server.seen if s["body"].get("seed") == 0)
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "judge" and first["body"]["max_tokens"] == 5
    assert first["body"]["messages"][0] == {"role": "system", "content": SYSTEM}
    assert any(s["path"] == "/v1/completions" and s["body"]["stop"] == ["END"] for s in server.seen)


def test_openai_backend_retries_busy_servers_then_reports_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("esc_evolve.generation.openai_backend.time.sleep", lambda _s: None)
    with loopback_server() as server:
        generator = OpenAIGenerator(server.base_url, "m", timeout=5, retries=2)
        server.fail_next = 2
        assert generator.generate([GenerationRequest(messages=chat("hi"))], progress=False)[0].text == "echo: hi"
        server.fail_next = 3
        with pytest.raises(GenerationError, match="answered 503"):
            generator.generate([GenerationRequest(messages=chat("hi"), id="busy")], progress=False)
    with pytest.raises(GenerationError, match=r"generation\.openai\.base_url"):
        monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
        build_generator(ModelSettings(), GenerationSettings(backend="openai"))


def test_openai_backend_sends_requests_concurrently_and_keeps_input_order() -> None:
    """Without timing: the first two requests are answered only once both are in flight (a client sending one at
    a time would fail here), and message 0 only after message 1 was answered, yet results come in input order.
    How much faster concurrency is: benchmarks/openai_backend.py."""
    both_sent = threading.Barrier(2, timeout=10)

    def content(body) -> str:
        return body["messages"][-1]["content"]

    def hold(body) -> float:
        if content(body) in ("message 0", "message 1"):
            both_sent.wait()
        deadline = time.monotonic() + 10
        while content(body) == "message 0" and "message 1" not in map(content, server.answered):
            assert time.monotonic() < deadline, "message 1 was never answered"
            time.sleep(0.01)
        return 0.0

    with loopback_server() as server:
        server.delay = hold
        generator = OpenAIGenerator(server.base_url, "m", timeout=15, max_concurrency=4)
        requests = [GenerationRequest(messages=chat(f"message {i}"), id=f"c{i}") for i in range(8)]
        results = generator.generate(requests, progress=False)
    assert [r.text for r in results] == [f"echo: message {i}" for i in range(8)]
    assert [r.request_id for r in results] == [f"c{i}" for i in range(8)]
    assert 2 <= server.max_in_flight <= 4
    answered = [content(b) for b in server.answered]
    assert sorted(answered) == [f"message {i}" for i in range(8)]
    assert answered.index("message 1") < answered.index("message 0")


def test_openai_backend_failure_drops_the_requests_not_yet_sent() -> None:
    """Request 0 is refused at once, every other one takes 0.1 s: sending all 20 would take 1 s with two
    workers. How many were sent before the call raised: benchmarks/openai_backend.py."""
    with loopback_server() as server:
        server.reject = lambda body: body["messages"][-1]["content"] == "message 0"
        server.delay = lambda body: 0.0 if body["messages"][-1]["content"] == "message 0" else 0.1
        generator = OpenAIGenerator(server.base_url, "m", timeout=5, max_concurrency=2)
        requests = [GenerationRequest(messages=chat(f"message {i}"), id=f"c{i}") for i in range(20)]
        with pytest.raises(GenerationError, match="request c0: .* answered 400"):
            generator.generate(requests, progress=False)
        sent = len(server.seen)
        time.sleep(0.3)
        assert len(server.seen) == sent  # nothing is sent after the call raised
    assert sent < 20  # the queue was dropped, not drained (not retried either: a 400)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed: the error path is moot")
def test_vllm_backend_without_vllm_is_a_clear_error() -> None:
    with pytest.raises(GenerationError, match=r"vllm is not installed.*\[gpu\]"):
        build_generator(ModelSettings(), GenerationSettings(backend="vllm"))


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm is not installed (optional extra `gpu`, CUDA only)"
)
def test_vllm_backend_generates_in_input_order(tiny_model_dir: Path) -> None:
    generator = build_generator(tiny_model_config(tiny_model_dir), GenerationSettings(backend="vllm", max_new_tokens=4))
    results = generator.generate(varied_requests(4), progress=False)
    assert [r.request_id for r in results] == [f"r{i}" for i in range(6)]
    assert all(r.num_tokens == 4 for r in results)


# ---------------------------------------------------------------------------------------------------------
# CLI


def test_generate_command_shows_replies_and_references(tiny_model_dir: Path) -> None:
    from esc_evolve.cli.generate_cmd import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command, so that typer keeps `generate` as a subcommand
    args = ["generate", "--model", str(tiny_model_dir), "--data", "builtin:valid", "--n", "2"]
    result = CliRunner().invoke(app, [*args, "--set", "generation.max_new_tokens=4", "--set", "model.device=cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.count("model reply") == 2 and result.output.count("human reference") == 2


# ---------------------------------------------------------------------------------------------------------
# The real backbone


@pytest.mark.backbone
def test_real_backbone_batched_equals_alone() -> None:
    model, tokenizer = load_for_generation(ModelSettings(device="cpu"))
    engine = make_engine(model, tokenizer, batch_size=4, max_new_tokens=24)
    requests = varied_requests(24)[:4]
    for request, result in zip(requests, engine.generate(requests, progress=False), strict=True):
        assert list(result.token_ids) == naive_tokens(model, tokenizer, request, engine.eos_ids), request.id
        assert result.text.strip()


def test_backends_are_registered_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """`generation.backend` names a registered builder; a project can add its own; unknown names list the known."""
    from esc_evolve.errors import ConfigError
    from esc_evolve.generation import factory, register_backend

    monkeypatch.setattr(factory.BACKENDS, "entries", dict(factory.BACKENDS.entries))  # registrations end here

    class Echo(Generator):
        def generate(self, requests, progress=True):
            return [GenerationResult(r.messages[-1]["content"], 1, "stop", r.id) for r in requests]

    @register_backend("echo")
    def _echo(model, generation, adapter, seed):
        return Echo()

    generator = build_generator(ModelSettings(), GenerationSettings(backend="echo"))
    assert generator.generate([GenerationRequest(messages=chat("hi"))])[0].text == "hi"
    unknown = r"unknown generation backend 'nope' \(generation.backend\); registered: echo, openai"
    with pytest.raises(ConfigError, match=unknown):
        build_generator(ModelSettings(), GenerationSettings(backend="nope"))
