"""Prefix reuse inside a batch: the reflection step of self-evolution with and without it, side by side.

The loop asks every reflection field of every context in one generate call (evolve/loop.py `_reflect`). The
fields of one context quote the same dialogue and differ only in their question, so with prefix reuse
(generation/prefill.py) the dialogue is computed once per context instead of once per field. This script builds
exactly those requests for N ESConv validation contexts (one per conversation, the middle supporter turn; the
packaged sample conversations if the ESConv file is absent) on the default backbone, with a fixed draft written
for the benchmark (the critique field quotes it), and generates them greedily with reuse on and off, alternating
(on, off, on, off) so that a busy machine weighs on both alike.

Reports per mode: wall time (the better of the runs), prompt tokens computed by the one-row prefill, and whether
the replies are token-identical between modes. Results: benchmarks/results/prefix_reuse.json; the output ends
with `speedup_reflection=` and `prefill_tokens_ratio=` and `identical=`.

    .venv/bin/python benchmarks/prefix_reuse.py                 # 16 contexts x 6 fields, ~7 min on 2 cores
    .venv/bin/python benchmarks/prefix_reuse.py --contexts 4    # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from esc_evolve.config import DataSettings, EvolveSettings, GenerationSettings, ModelSettings
from esc_evolve.data import build_turn_samples, load_split
from esc_evolve.evolve.loop import reflection_prompt
from esc_evolve.evolve.principles import load_principles
from esc_evolve.generation import GenerationRequest, prefill  # noqa: F401 - prefill: the module patched below
from esc_evolve.generation import hf as hf_backend
from esc_evolve.generation.hf import TransformersGenerator
from esc_evolve.models import load_model

ESCONV_VALID = Path(os.environ.get("ESC_EVOLVE_SHARED_DATA", "../shared/data")) / "esconv" / "valid.jsonl"
RESULTS = Path(__file__).parent / "results" / "prefix_reuse.json"
DRAFT = "That sounds really hard. I'm here to listen, so tell me more about what happened."


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model(ModelSettings(name=args.model))
    requests, source = build_requests(tokenizer, args.contexts)
    settings = GenerationSettings(temperature=0.0, batch_size=args.batch_size)
    engine = TransformersGenerator(model, tokenizer, settings)
    engine.generate(requests[:2], progress=False)  # warm-up, not timed
    counted = count_prefill_tokens()
    runs: dict[str, list[dict[str, Any]]] = {"reuse": [], "no_reuse": []}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(timed(engine, requests, reuse=mode == "reuse", counted=counted))
            print(f"{mode:>8}: {runs[mode][-1]['seconds']:.1f} s, {runs[mode][-1]['prefill_tokens']} prefill tokens")
    best = {mode: min(r["seconds"] for r in rs) for mode, rs in runs.items()}
    tokens = {mode: rs[0]["prefill_tokens"] for mode, rs in runs.items()}
    identical = runs["reuse"][0]["token_ids"] == runs["no_reuse"][0]["token_ids"]
    same_share = sum(
        a == b for a, b in zip(runs["reuse"][0]["token_ids"], runs["no_reuse"][0]["token_ids"], strict=True)
    )
    report = {
        "machine": {
            "cpu": cpu_model(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
        },
        "workload": {"source": source, "contexts": len(requests) // args.fields, "requests": len(requests)},
        "seconds": {m: [r["seconds"] for r in rs] for m, rs in runs.items()},
        "best_seconds": best,
        "prefill_tokens": tokens,
        "identical_replies": f"{same_share}/{len(requests)}",
        "speedup_reflection": best["no_reuse"] / best["reuse"],
        "prefill_tokens_ratio": tokens["no_reuse"] / max(tokens["reuse"], 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"results in {args.out}")
    print(f"speedup_reflection={report['speedup_reflection']:.2f}")
    print(f"prefill_tokens_ratio={report['prefill_tokens_ratio']:.2f}")
    print(f"identical={str(identical).lower()} ({same_share}/{len(requests)})")


def build_requests(tokenizer: Any, count: int) -> tuple[list[GenerationRequest], str]:
    """Every reflection field of `count` contexts, as the loop's `_reflect` asks them."""
    source = str(ESCONV_VALID) if ESCONV_VALID.is_file() else "builtin:all"
    data, evolve = DataSettings(), EvolveSettings()
    principles = load_principles(evolve.principles_path)
    requests = []
    for conversation in load_split(source, data).conversations[:count]:
        samples = build_turn_samples([conversation], data.context_window)
        if not samples:
            continue
        sample = samples[len(samples) // 2]
        for field in principles.reflection_fields:
            messages = reflection_prompt(tokenizer, field, sample.context, principles, DRAFT, None)
            max_new = min(field.max_new_tokens, evolve.reflection_max_new_tokens)
            requests.append(
                GenerationRequest(messages=messages, continuation=field.prefix, max_new_tokens=max_new, stop=("\n",))
            )
    return requests, source


def count_prefill_tokens() -> list[int]:
    """Wrap the one-row prefill so that the prompt tokens it computes are counted."""
    counts: list[int] = []
    forward = prefill._forward

    def counting(model, cache_name, ids, start, upto=None):
        counts.append(len(ids))
        return forward(model, cache_name, ids, start, upto)

    prefill._forward = counting
    return counts


def timed(engine: TransformersGenerator, requests: list, *, reuse: bool, counted: list[int]) -> dict[str, Any]:
    original = hf_backend.row_prefilled_cache

    def without_reuse(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, "reuse_min": 0})

    hf_backend.row_prefilled_cache = original if reuse else without_reuse
    counted.clear()
    try:
        started = time.perf_counter()
        results = engine.generate(requests, progress=False)
        seconds = time.perf_counter() - started
    finally:
        hf_backend.row_prefilled_cache = original
    return {"seconds": seconds, "prefill_tokens": sum(counted), "token_ids": [r.token_ids for r in results]}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="generation.batch_size (the loop's default).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each mode, alternating.")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.fields = len(load_principles(EvolveSettings().principles_path).reflection_fields)
    return args


if __name__ == "__main__":
    main()
