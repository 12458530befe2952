"""The OpenAI-compatible backend as a farm: several servers, least-loaded spreading, served LoRA names per model,
results in input order, a failing server named in the error."""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from esc_evolve.config import GenerationSettings, ModelSettings, OpenAISettings
from esc_evolve.generation import GenerationError, GenerationRequest, build_generator
from esc_evolve.generation.factory import requests_per_call
from esc_evolve.generation.openai_backend import OpenAIGenerator, ServerPool
from tests.generation_fixtures import loopback_server


def _requests(n: int) -> list[GenerationRequest]:
    return [GenerationRequest(messages=[{"role": "user", "content": f"message {i}"}], id=f"c{i}") for i in range(n)]


def _farm(servers, **openai) -> GenerationSettings:
    urls = [s.base_url for s in servers]
    return GenerationSettings(backend="openai", openai=OpenAISettings(base_url=urls, **openai))


def test_requests_spread_over_the_farm_and_come_back_in_order() -> None:
    with ExitStack() as stack:
        servers = [stack.enter_context(loopback_server()) for _ in range(3)]
        for server in servers:
            server.delay = lambda body: 0.02
        settings = _farm(servers, model="m", max_concurrency=12)
        generator = build_generator(ModelSettings(), settings)
        results = generator.generate(_requests(60), progress=False)
    assert [r.text for r in results] == [f"echo: message {i}" for i in range(60)]
    assert [r.request_id for r in results] == [f"c{i}" for i in range(60)]
    counts = [len(s.seen) for s in servers]
    assert sum(counts) == 60 and min(counts) >= 10, counts  # all three did a share of the work
    assert sum(s.max_in_flight for s in servers) <= 12


def test_the_least_loaded_server_gets_the_next_request() -> None:
    pool = ServerPool(["a", "b", "c"])
    first = [pool.acquire() for _ in range(3)]
    assert sorted(first) == ["a", "b", "c"]  # an idle farm is filled evenly
    pool.release("b")
    assert pool.acquire() == "b"  # the only one with a free slot
    pool.release("a")
    assert pool.acquire(avoid=["a"]) in ("b", "c")  # a retry avoids the server it failed on


def test_a_slow_server_gets_fewer_requests() -> None:
    with loopback_server() as fast, loopback_server() as slow:
        slow.delay = lambda body: 0.2
        fast.delay = lambda body: 0.01
        generator = OpenAIGenerator([fast.base_url, slow.base_url], "m", max_concurrency=4, timeout=10)
        generator.generate(_requests(40), progress=False)
    assert len(fast.seen) > 3 * len(slow.seen)


def test_a_failing_server_is_named() -> None:
    with loopback_server() as good, loopback_server() as bad:
        bad.reject = lambda body: True  # 400: not retried, the call fails
        generator = OpenAIGenerator([good.base_url, bad.base_url], "m", max_concurrency=2, timeout=10, retries=0)
        with pytest.raises(GenerationError, match=f"{bad.base_url}/chat/completions answered 400"):
            generator.generate(_requests(6), progress=False)


def test_a_dead_server_is_retried_elsewhere_and_named_when_it_is_the_only_one() -> None:
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    with loopback_server() as good:
        generator = OpenAIGenerator([dead, good.base_url], "m", max_concurrency=2, timeout=5, retries=1)
        started = time.perf_counter()
        results = generator.generate(_requests(4), progress=False)
        assert [r.text for r in results] == [f"echo: message {i}" for i in range(4)]
        assert time.perf_counter() - started < 5
    alone = OpenAIGenerator([dead], "m", timeout=5, retries=0)
    with pytest.raises(GenerationError, match=f"cannot reach {dead}/chat/completions"):
        alone.generate(_requests(1), progress=False)


def test_each_model_of_a_run_is_asked_for_under_its_served_name(tmp_path: Path) -> None:
    m1 = tmp_path / "iter1" / "m1"
    with loopback_server() as server:
        settings = _farm([server], model="backbone", served_models={"m0": "esc-m0", "m1": "esc-m1"})
        build_generator(ModelSettings(), settings).generate(_requests(1), progress=False)
        build_generator(ModelSettings(), settings, m1).generate(_requests(1), progress=False)
        with pytest.raises(GenerationError, match=r"map 'm2'.*served_models.*--lora-modules m2="):
            build_generator(ModelSettings(), settings, tmp_path / "iter2" / "m2")
    assert [s["body"]["model"] for s in server.seen] == ["backbone", "esc-m1"]


def test_a_continuation_loads_the_model_s_tokenizer_when_first_needed(tiny_model_dir: Path) -> None:
    request = GenerationRequest(messages=[{"role": "user", "content": "hi"}], continuation="The emotion", id="r")
    with loopback_server() as server:
        settings = _farm([server], model="m")
        generator = build_generator(ModelSettings(name=str(tiny_model_dir)), settings)
        assert generator.tokenizer is None  # a judge never pays for it
        generator.generate([request], progress=False)
    assert generator.tokenizer is not None
    assert server.seen[0]["path"] == "/v1/completions" and isinstance(server.seen[0]["body"]["prompt"], list)


def test_a_farm_is_handed_enough_requests_per_call() -> None:
    assert requests_per_call(GenerationSettings(batch_size=16)) == 16
    farm = GenerationSettings(backend="openai", batch_size=16, openai=OpenAISettings(max_concurrency=256))
    assert requests_per_call(farm) == 256
    assert requests_per_call(GenerationSettings(backend="vllm")) >= 1024
