"""Serving under load: N concurrent streaming clients against `esc-evolve serve` on the default backbone.

One process: the server is the app of `esc-evolve serve` (serving/app.py, its batcher, the safety layer with the
packaged risk detector in front, the store off), run by uvicorn in a thread on 127.0.0.1 and a free port; the
clients are threads with the official `openai` client, talking to it over loopback only. At each concurrency
level (default 1, 4 and 16 clients) every client sends `--requests-per-client` streamed requests one after the
other, each one ordinary seeker message of a fixed set written for this benchmark (no dataset), `max_tokens` 48,
temperature 0, with `stream_options.include_usage` so that the server reports the tokens it generated.

Per level:
  ttft           time from sending a request to its first non-empty content piece (the role chunk does not count;
                 the safety check releases text a sentence at a time, and a request that shared a batch gets its
                 whole reply at once, so under load this is close to the total latency)
  latency        time from sending a request to the end of its stream
  tokens/s       completion tokens (the server's `usage`) of all the level's replies / the level's wall time
  errors         requests that raised, got an HTTP error or an error event in the stream
  lost           requests that ended without a finish reason or usage, or were not done by the level's deadline
  rss            this process's resident memory (server, model and clients together) before and after the level
  batches        the sizes of the engine calls the server's batcher made during the level

Bounded: at most 64 clients and 16 requests each, a per-request timeout and a per-level deadline. Results go to
benchmarks/results/serve_load.json; the output ends with `concurrency_speedup=<tokens/s at the last level of
--clients / tokens/s at the first>` (16 clients over 1 with the defaults).

    .venv/bin/python benchmarks/serve_load.py                               # 1, 4, 16 clients, 3 requests each; ~1 min
    .venv/bin/python benchmarks/serve_load.py --clients 1,4,16 --requests-per-client 2   # quicker
    .venv/bin/python benchmarks/serve_load.py --clients 1,8 --max-tokens 96 --out /tmp/load.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import openai
import psutil
import torch

from esc_evolve.cli.model_arg import resolve_model
from esc_evolve.generation import build_generator
from esc_evolve.safety.guard import SafetyGuard
from esc_evolve.serving.app import create_app
from esc_evolve.serving.live import serving
from esc_evolve.serving.store import SeekerStore

RESULTS = Path(__file__).parent / "results" / "serve_load.json"
MAX_CLIENTS = 64
MAX_REQUESTS_PER_CLIENT = 16

# Ordinary things a seeker might say (no risk wording), written for this benchmark.
MESSAGES = [
    "My contract ends next month and nobody at work tells me anything.",
    "I failed my driving test again and I feel so stupid.",
    "My best friend moved to another city and I feel lonely in the evenings.",
    "I have exams in two weeks and I can't concentrate on anything.",
    "My parents keep arguing about money and I don't know what to do.",
    "I started a new job and I feel like everyone is better than me.",
    "My partner and I had a fight and we haven't spoken for three days.",
    "I can't sleep well since I moved into this noisy apartment.",
    "My dog is old and sick and the vet says he doesn't have long.",
    "I got rejected from the university I really wanted to go to.",
    "My manager criticised my report in front of the whole team.",
    "I'm worried about my mother, she has been forgetting things lately.",
    "I feel stuck in my career and I don't know how to change it.",
    "My roommate never cleans up and I'm tired of asking.",
    "I spend too much time on my phone and I feel bad about it.",
    "I want to make new friends but I'm shy and don't know where to start.",
]


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    process = psutil.Process()
    rss_start = rss_mb(process)
    load_before = os.getloadavg()[0]

    loaded_at = time.monotonic()
    cfg, model_config, adapter, _ = resolve_model(args.model, None, ["serve.store=false", "serve.host=127.0.0.1"])
    guard = SafetyGuard(cfg.safety)  # the packaged risk detector, as `esc-evolve serve` loads it
    store = SeekerStore(None, enabled=False)
    key = os.environ.get(cfg.serve.api_key_env) or "unused"
    with build_generator(model_config, cfg.generation, adapter, seed=cfg.run.seed) as generator:
        app = create_app(generator, cfg, guard, store, args.model)
        batcher = app.state.server.batcher
        with serving(app, start_timeout=60) as url:
            load_seconds = time.monotonic() - loaded_at
            warm = one_request(url, key, MESSAGES[0], args.max_tokens, args.request_timeout)  # not counted
            levels = []
            for clients in args.clients:
                levels.append(measured_level(url, key, clients, args, batcher, process))
            # Memory over a longer run: the last level again, `--soak` times. Flat = no growth from round to round
            # once the engine has seen its largest batch (the first level at that size allocates its working set).
            soak = [measured_level(url, key, args.clients[-1], args, batcher, process) for _ in range(args.soak)]
    first, last = levels[0], levels[-1]
    soak_rss = [last["rss_mb_after"], *(level["rss_mb_after"] for level in soak)]
    growth = soak_rss[-1] - soak_rss[0] if soak else None
    speedup = last["tokens_per_s"] / first["tokens_per_s"] if first["tokens_per_s"] else 0.0
    report = {
        "machine": {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "openai": openai.__version__,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
        },
        "server": {
            "model": args.model,
            "backend": cfg.generation.backend,
            "dtype": model_config.dtype,
            "batch_window_ms": cfg.serve.batch_window_ms,
            "max_batch": cfg.serve.max_batch,
            "store": False,
            "safety": "packaged risk detector (SafetyGuard defaults)",
            "load_seconds": load_seconds,
        },
        "workload": {
            "clients": args.clients,
            "requests_per_client": args.requests_per_client,
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "messages": len(MESSAGES),
        },
        "warm_up": {k: warm[k] for k in ("ok", "latency_s", "completion_tokens")},
        "rss_mb_start": rss_start,
        "rss_mb_end": rss_mb(process),
        "levels": levels,
        "soak": soak,
        "soak_rss_mb": soak_rss,
        "memory_growth_mb": growth,
        "concurrency_speedup": speedup,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"rss_mb start={rss_start:.0f} end={report['rss_mb_end']:.0f}; results in {args.out}")
    if growth is not None:
        rounds = " -> ".join(f"{r:.0f}" for r in soak_rss)
        print(f"rss after each round at {args.clients[-1]} clients: {rounds} MB; memory_growth_mb={growth:.0f}")
    print(f"concurrency_speedup={speedup:.2f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,16", help="Concurrency levels, comma-separated (max 64).")
    parser.add_argument("--requests-per-client", type=int, default=3, help="Requests each client sends in turn.")
    parser.add_argument("--max-tokens", type=int, default=48, help="max_tokens of every request.")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Backbone alias or model folder.")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="Seconds before a request fails.")
    parser.add_argument("--level-timeout", type=float, default=240.0, help="Seconds before a level's rest is lost.")
    parser.add_argument("--soak", type=int, default=3, help="Rounds of the last level again, for memory (0-10).")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Results JSON.")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if not args.clients or not all(1 <= c <= MAX_CLIENTS for c in args.clients):
        parser.error(f"--clients: between 1 and {MAX_CLIENTS} each")
    if not 0 <= args.soak <= 10:
        parser.error("--soak: between 0 and 10")
    if not 1 <= args.requests_per_client <= MAX_REQUESTS_PER_CLIENT:
        parser.error(f"--requests-per-client: between 1 and {MAX_REQUESTS_PER_CLIENT}")
    return args


# ---------------------------------------------------------------------------------------------------------
# The server and the clients


def one_request(url: str, key: str, message: str, max_tokens: int, timeout: float) -> dict[str, Any]:
    """One streamed request: its timings, tokens and outcome (`ok`, else `error` or `lost`)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=timeout)
    row: dict[str, Any] = {"ok": False, "error": None, "lost": False, "ttft_s": None, "completion_tokens": 0}
    sent = time.monotonic()
    finish = usage = None
    try:
        stream = client.chat.completions.create(
            model="served",
            messages=[{"role": "user", "content": message}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            extra = chunk.model_extra or {}
            if "error" in extra:
                raise RuntimeError(f"error event: {extra['error']}")
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content and row["ttft_s"] is None:
                    row["ttft_s"] = time.monotonic() - sent
                finish = choice.finish_reason or finish
    except Exception as exc:  # counted, not raised: the benchmark reports errors
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    row["latency_s"] = time.monotonic() - sent
    if row["error"] is None:
        if finish is None or usage is None:
            row["lost"] = True
        else:
            row["ok"] = True
            row["completion_tokens"] = usage.completion_tokens
    return row


def measured_level(
    url: str, key: str, clients: int, args: argparse.Namespace, batcher: Any, process: psutil.Process
) -> dict[str, Any]:
    before = len(batcher.batch_sizes)
    level = run_level(url, key, clients, args)
    level["batch_sizes"] = batcher.batch_sizes[before:]
    level["rss_mb_before"], level["rss_mb_after"] = level.pop("_rss_before"), rss_mb(process)
    print_level(level)
    return level


def run_level(url: str, key: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """`clients` threads, each sending `requests_per_client` requests in turn; unfinished at the deadline: lost."""
    process = psutil.Process()
    rss_before = rss_mb(process)
    rows: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for i in range(args.requests_per_client):
            message = MESSAGES[(index * args.requests_per_client + i) % len(MESSAGES)]
            row = one_request(url, key, message, args.max_tokens, args.request_timeout)
            with lock:
                rows.append(row)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    deadline = started + args.level_timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    wall = time.monotonic() - started
    with lock:
        done = list(rows)
    expected = clients * args.requests_per_client
    ok = [r for r in done if r["ok"]]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    latency = [r["latency_s"] for r in ok]
    tokens = sum(r["completion_tokens"] for r in ok)
    return {
        "clients": clients,
        "requests": expected,
        "completed": len(ok),
        "errors": sum(r["error"] is not None for r in done),
        "lost": sum(r["lost"] for r in done) + (expected - len(done)),
        "error_messages": sorted({r["error"] for r in done if r["error"]})[:5],
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "latency_p50_s": percentile(latency, 50),
        "latency_p95_s": percentile(latency, 95),
        "_rss_before": rss_before,
    }


# ---------------------------------------------------------------------------------------------------------
# Helpers


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile, linearly interpolated (None when there is nothing)."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def rss_mb(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or platform.machine()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def print_level(level: dict[str, Any]) -> None:
    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    print(
        f"clients={level['clients']:>2}  requests={level['completed']}/{level['requests']}  "
        f"ttft p50/p95 {s(level['ttft_p50_s'])}/{s(level['ttft_p95_s'])} s  "
        f"latency p50/p95 {s(level['latency_p50_s'])}/{s(level['latency_p95_s'])} s  "
        f"{level['tokens_per_s']:.1f} tok/s  errors={level['errors']} lost={level['lost']}  "
        f"rss {level['rss_mb_before']:.0f}->{level['rss_mb_after']:.0f} MB  batches={level['batch_sizes']}",
        flush=True,
    )
    for message in level["error_messages"]:
        print(f"  error: {message}", flush=True)


if __name__ == "__main__":
    main()
