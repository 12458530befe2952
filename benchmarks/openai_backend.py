"""The OpenAI-compatible backend's concurrency, timed: what tests/test_generation.py checks without a clock.

A stub server on 127.0.0.1 (standard library, a free port) answers every chat request after `--delay` seconds,
echoing the last message. Two measurements, in one process:
  concurrency  `--requests` requests sent with `max_concurrency` 1, then `--concurrency`: wall times, their ratio,
               the most requests the server held at once, whether answers arrived out of input order (they
               should, the results must not)
  failure      20 requests, `max_concurrency` 2, request 0 refused with a 400 at once and the others answered
               after `--delay`: how many the server got before the call raised, and whether any came later

These are timings: on a busy machine the numbers move (threads wait to be scheduled), which is why the tests
assert only what holds regardless. Results go to benchmarks/results/openai_backend.json; the output ends with
`concurrency_speedup=<x>`.

    .venv/bin/python benchmarks/openai_backend.py                       # ~3 s
    .venv/bin/python benchmarks/openai_backend.py --requests 64 --concurrency 16 --delay 0.02
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from esc_evolve.generation import GenerationError, GenerationRequest
from esc_evolve.generation.openai_backend import OpenAIGenerator

RESULTS = Path(__file__).parent / "results" / "openai_backend.json"


class StubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, delay: float) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.delay = delay
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.received: list[str] = []
        self.answered: list[str] = []


class Handler(BaseHTTPRequestHandler):
    server: StubServer

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        said = body["messages"][-1]["content"]
        server = self.server
        with server.lock:
            server.received.append(said)
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            if said == "refuse me":
                self._send(400, {"error": "refused"})
                return
            time.sleep(server.delay)
            choice = {"message": {"role": "assistant", "content": f"echo: {said}"}, "finish_reason": "stop"}
            self._send(200, {"choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
        finally:
            with server.lock:
                server.in_flight -= 1
                server.answered.append(said)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def serve(delay: float) -> tuple[StubServer, str]:
    server = StubServer(delay)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def requests(n: int, first: str | None = None) -> list[GenerationRequest]:
    said = [f"message {i}" for i in range(n)]
    if first:
        said[0] = first
    return [GenerationRequest(messages=[{"role": "user", "content": s}], id=f"c{i}") for i, s in enumerate(said)]


def timed_run(n: int, concurrency: int, delay: float) -> dict[str, Any]:
    server, url = serve(delay)
    try:
        started = time.perf_counter()
        results = OpenAIGenerator(url, "m", timeout=30, max_concurrency=concurrency).generate(requests(n), False)
        wall = time.perf_counter() - started
    finally:
        server.shutdown()
    return {
        "max_concurrency": concurrency,
        "wall_seconds": round(wall, 3),
        "max_in_flight": server.max_in_flight,
        "answered_out_of_order": server.answered != sorted(server.answered, key=lambda s: int(s.split()[-1])),
        "results_in_input_order": [r.request_id for r in results] == [f"c{i}" for i in range(n)],
    }


def failure_run(delay: float) -> dict[str, Any]:
    server, url = serve(delay)
    try:
        generator = OpenAIGenerator(url, "m", timeout=30, max_concurrency=2)
        started = time.perf_counter()
        try:
            generator.generate(requests(20, first="refuse me"), False)
            raised = False
        except GenerationError:
            raised = True
        wall = time.perf_counter() - started
        sent = len(server.received)
        time.sleep(max(0.3, 3 * delay))
        later = len(server.received) - sent
    finally:
        server.shutdown()
    return {"raised": raised, "sent_before_raise": sent, "sent_after_raise": later, "wall_seconds": round(wall, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.05, help="Seconds the stub server takes per answer.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sequential = timed_run(args.requests, 1, args.delay)
    concurrent = timed_run(args.requests, args.concurrency, args.delay)
    speedup = sequential["wall_seconds"] / concurrent["wall_seconds"]
    failure = failure_run(args.delay)
    result = {
        "requests": args.requests,
        "delay_seconds": args.delay,
        "sequential": sequential,
        "concurrent": concurrent,
        "concurrency_speedup": round(speedup, 2),
        "failure": failure,
        "machine": platform.platform(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    print(f"concurrency_speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
