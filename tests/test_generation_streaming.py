"""Streaming a batch: `Generator.generate_stream` passes each request's text on while its batch decodes (the
transformers engine through decoding.RowStreamer), the pieces add up to the result, stops and cancellation work
per row; and the server's batcher lets requests that arrive together share one engine call."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from esc_evolve.generation import GenerationRequest, GenerationResult, Generator, load_for_generation
from esc_evolve.serving.batching import Batcher
from tests.generation_fixtures import chat, make_engine, tiny_model_config, varied_requests


@pytest.fixture(scope="module")
def engine(varied_model_dir: Path):
    model, tokenizer = load_for_generation(tiny_model_config(varied_model_dir))
    return make_engine(model, tokenizer, max_new_tokens=24)


def collect(engine: Generator, requests, cancelled=None) -> tuple[list[GenerationResult], dict[int, list[str]]]:
    pieces: dict[int, list[str]] = {i: [] for i in range(len(requests))}
    results = engine.generate_stream(requests, lambda i, piece: pieces[i].append(piece), cancelled)
    return results, pieces


def test_a_streamed_batch_gives_generates_results_in_pieces(engine) -> None:
    requests = varied_requests(24)
    results, pieces = collect(engine, requests)
    assert results == engine.generate(requests, progress=False)  # streaming changes nothing in the results
    assert all("".join(pieces[i]) == r.text for i, r in enumerate(results))
    # Text is passed on while the batch decodes, not once at the end: a reply of many tokens comes in many pieces.
    assert all(len(pieces[i]) >= r.num_tokens // 3 >= 2 for i, r in enumerate(results))
    assert all(p for ps in pieces.values() for p in ps)  # no empty pieces


def test_stop_strings_end_a_row_without_passing_on_the_stop(engine) -> None:
    request = varied_requests(24)[1]
    (full,) = engine.generate([request], progress=False)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = GenerationRequest(messages=request.messages, max_new_tokens=24, stop=(stop,))
    (result, _), pieces = collect(engine, [cut, request])
    assert result.text == full.text[: full.text.index(stop)] == "".join(pieces[0])
    assert "".join(pieces[1]) == full.text  # the other row of the batch goes on to its own end


def test_a_cancelled_row_stops_while_the_others_go_on(engine) -> None:
    requests = [
        GenerationRequest(messages=chat(f"Tell me about day {i} of my week."), max_new_tokens=24) for i in (1, 2)
    ]
    alone = engine.generate(requests, progress=False)
    assert all(r.num_tokens == 24 for r in alone)  # the tiny model runs to its budget: a stop is the cancel's doing
    results, pieces = collect(engine, requests, cancelled=lambda i: i == 0)
    assert results[0].num_tokens == 1 and results[0].finish_reason == "length" and results[1] == alone[1]
    assert "".join(pieces[0]) == results[0].text


class Recording(Generator):
    """Answers at once; records the size of every engine call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def generate(self, requests, progress=True):
        self.calls.append(len(requests))
        return [GenerationResult("ok", 1, "stop") for _ in requests]


def request(text: str) -> GenerationRequest:
    return GenerationRequest(messages=chat(text))


def test_an_announced_request_joins_the_batch_of_the_one_queued_before_it() -> None:
    engine = Recording()
    batcher = Batcher(engine, window_ms=1, max_wait_ms=5000).start()
    try:
        release = batcher.announce()  # arrived, still being checked
        first = batcher.submit(request("first"))
        time.sleep(0.3)  # far longer than the window: without the announcement the first would run alone
        second = batcher.submit(request("second"), announced=release)
        assert first.result(10).text == "ok" and second.result(10).text == "ok"
        assert engine.calls == [2]

        # Without an announcement, a request queued after the window goes into the next call.
        third = batcher.submit(request("third"))
        third.result(10)
        time.sleep(0.1)
        batcher.submit(request("fourth")).result(10)
        assert engine.calls == [2, 1, 1]
    finally:
        batcher.stop()


def test_the_wait_for_announced_requests_is_bounded() -> None:
    engine = Recording()
    batcher = Batcher(engine, window_ms=1, max_wait_ms=200).start()
    try:
        release = batcher.announce()  # never submitted (e.g. answered by the safe reply and never released)
        started = time.monotonic()
        batcher.submit(request("alone")).result(10)
        waited = time.monotonic() - started
        assert engine.calls == [1] and 0.15 < waited < 5
        release()
        release()  # a second release changes nothing
        started = time.monotonic()
        batcher.submit(request("after")).result(10)
        assert time.monotonic() - started < 0.15
    finally:
        batcher.stop()


def test_streamed_jobs_of_one_batch_get_their_pieces_before_the_batch_ends() -> None:
    gate = threading.Event()

    class TwoStep(Generator):
        def generate(self, requests, progress=True):
            raise AssertionError("a batch with streamed requests must be streamed")

        def generate_stream(self, requests, on_text, cancelled=None):
            for i in range(len(requests)):
                on_text(i, f"first {i}. ")
            assert gate.wait(10)
            for i in range(len(requests)):
                on_text(i, f"second {i}.")
            return [GenerationResult(f"first {i}. second {i}.", 4, "stop") for i in range(len(requests))]

    batcher = Batcher(TwoStep(), window_ms=50).start()
    try:
        jobs = [batcher.submit(request(f"m{i}"), stream=True) for i in range(3)]
        firsts = [next(job.pieces()) for job in jobs]  # while the engine is still inside the batch
        assert firsts == ["first 0. ", "first 1. ", "first 2. "] and batcher.batch_sizes == [3]
        gate.set()
        assert [job.result(10).text for job in jobs] == [f"first {i}. second {i}." for i in range(3)]
    finally:
        gate.set()
        batcher.stop()
