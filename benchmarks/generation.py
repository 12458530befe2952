"""Generation throughput on one machine, in one process: a naive loop vs our engine vs the compute roofline.

On the same prompts (one ESConv validation context per conversation, rendered with the backbone's chat template
and the default system prompt; the packaged sample conversations if the ESConv file is absent), greedy, 64 new
tokens, default backbone in fp32:
  naive     `model.generate` called on one prompt at a time
  engine    `TransformersGenerator` with its defaults (batching by length, static cache, shared prefix)
Roofline: the measured fp32 matmul GFLOP/s at the model's own layer shapes (M=256 rows, the best case: compute
bound, no attention) divided by 2 x (decoder linear weights + LM head) FLOPs per generated token. Embedding
lookups, norms, RoPE and attention are not counted. That decode-only roofline ignores the prompt: the "workload
roofline" also charges 2 x decoder linear weights per prompt token (prefill), which on ESConv contexts
(~300 prompt tokens per 64 new ones) is most of the work; both fractions are in the JSON and the table.

tok/s counts generated tokens (up to and including the end-of-sequence token) over wall time, tokenisation
included. Results go to benchmarks/results/generation.json; the output ends with three lines:
`speedup_vs_naive=<x>`, `roofline_fraction=<y>` (decode-only roofline), `greedy_identical=<true|false>`.

    .venv/bin/python benchmarks/generation.py                  # 32 prompts, ~3 min on a quiet 2-core CPU
    .venv/bin/python benchmarks/generation.py --prompts 8      # quick look
    .venv/bin/python benchmarks/generation.py --sweep          # also compare engine settings (batch, cache, prefix)
    python benchmarks/generation.py --model DIR --device cuda --dtype bfloat16 --batch-size 64 --out gpu.json
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

from esc_evolve.config import DataSettings, GenerationSettings, ModelSettings
from esc_evolve.data import build_turn_samples, load_split
from esc_evolve.data.prompts import build_messages
from esc_evolve.generation import GenerationRequest
from esc_evolve.generation.hf import TransformersGenerator
from esc_evolve.models import load_model

# ESConv is never shipped: point --data at your copy, or set $ESC_EVOLVE_SHARED_DATA (the shared data folder).
ESCONV_VALID = Path(os.environ.get("ESC_EVOLVE_SHARED_DATA", "../shared/data")) / "esconv" / "valid.jsonl"
RESULTS = Path(__file__).parent / "results" / "generation.json"
REPEATS_PER_TIMING = 4  # several products per timing, so that a GPU's launch latency does not dominate


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(ModelSettings(name=args.model, device=args.device, dtype=args.dtype))
    requests, source = build_requests(args.data, args.prompts)
    config = GenerationSettings(max_new_tokens=args.new_tokens, temperature=0.0, batch_size=args.batch_size)
    engine = TransformersGenerator(model, tokenizer, config)
    prompt_ids = [list(engine._prepare(i, r).ids) for i, r in enumerate(requests)]
    load_before = os.getloadavg()[0]

    gflops_before = matmul_gflops(model)
    warm_up(model, engine, prompt_ids, requests, args.new_tokens)
    naive_runs = [run_naive(model, prompt_ids, args.new_tokens, engine.eos_ids) for _ in range(args.repeats)]
    engine_runs = [run_engine(engine, requests) for _ in range(args.repeats)]
    naive, engine_best = min(naive_runs, key=lambda r: r["seconds"]), min(engine_runs, key=lambda r: r["seconds"])
    sweep = run_sweep(model, tokenizer, config, requests, args) if args.sweep else []

    gflops = max(gflops_before, matmul_gflops(model))
    counts = flop_counts(model)
    generated = engine_best["tokens"]
    roofline = gflops * 1e9 / counts["decode_flops_per_token"]
    prompt_flops = counts["prefill_flops_per_token"] * sum(len(p) for p in prompt_ids)
    workload_seconds = (prompt_flops + counts["decode_flops_per_token"] * generated) / (gflops * 1e9)
    workload_roofline = generated / workload_seconds
    identical = [a == b for a, b in zip(naive["tokens_per_prompt"], engine_best["tokens_per_prompt"], strict=True)]

    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": str(model.device),
            "gpu": torch.cuda.get_device_name() if model.device.type == "cuda" else None,
            "dtype": str(model.dtype),
            "model": args.model,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
        },
        "workload": {
            "source": source,
            "prompts": len(requests),
            "mean_prompt_tokens": sum(len(p) for p in prompt_ids) / len(prompt_ids),
            "max_new_tokens": args.new_tokens,
            "generated_tokens": generated,
            "repeats": args.repeats,
            "batch_size": config.batch_size,
        },
        "naive_tok_s": naive["tok_s"],
        "engine_tok_s": engine_best["tok_s"],
        "naive_runs_tok_s": [r["tok_s"] for r in naive_runs],
        "engine_runs_tok_s": [r["tok_s"] for r in engine_runs],
        "matmul_gflops": gflops,
        "flops": counts,
        "roofline_tok_s": roofline,
        "workload_roofline_tok_s": workload_roofline,
        "speedup_vs_naive": engine_best["tok_s"] / naive["tok_s"],
        "roofline_fraction": engine_best["tok_s"] / roofline,
        "workload_roofline_fraction": engine_best["tok_s"] / workload_roofline,
        "greedy_identical_prompts": sum(identical),
        "greedy_identical": all(identical),
        "sweep": sweep,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_table(report)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32, help="Contexts to complete (one per conversation).")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--data", type=Path, default=ESCONV_VALID, help="ESConv .jsonl; builtin data if absent.")
    parser.add_argument("--repeats", type=int, default=1, help="Timed runs of each method; the fastest counts.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default).")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Backbone alias or model folder.")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=int, default=GenerationSettings().batch_size, help="The engine's batch.")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Results JSON.")
    parser.add_argument("--sweep", action="store_true", help="Also time engine settings against each other.")
    return parser.parse_args()


def build_requests(path: Path, count: int) -> tuple[list[GenerationRequest], str]:
    """One context per conversation (the middle supporter turn), so that prompts do not share histories."""
    source = str(path) if path.is_file() else "builtin:all"
    data = DataSettings()
    requests = []
    for conversation in load_split(source, data).conversations:
        samples = build_turn_samples([conversation], data.context_window)
        if samples:
            sample = samples[len(samples) // 2]
            requests.append(GenerationRequest(messages=build_messages(sample.context, data.system_prompt)))
        if len(requests) == count:
            break
    return requests, source


def warm_up(model: Any, engine: TransformersGenerator, ids: list[list[int]], requests: list, new: int) -> None:
    """One short pass of each method, so that neither pays first-call costs (allocator, kernel choice)."""
    run_naive(model, ids[:1], min(new, 8), engine.eos_ids)
    engine.generate(requests[:2], progress=False)


def run_naive(model: Any, prompt_ids: list[list[int]], new: int, eos_ids: list[int]) -> dict[str, Any]:
    outputs = []
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in prompt_ids:
            input_ids = torch.tensor([ids], device=model.device)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=eos_ids,
                pad_token_id=eos_ids[0],
            )
            outputs.append(until_eos(out[0, len(ids) :].tolist(), eos_ids))
    seconds = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, "tokens_per_prompt": outputs}


def run_engine(engine: TransformersGenerator, requests: list[GenerationRequest]) -> dict[str, Any]:
    start = time.perf_counter()
    results = engine.generate(requests, progress=False)
    seconds = time.perf_counter() - start
    tokens = sum(r.num_tokens for r in results)
    outputs = [list(r.token_ids) for r in results]
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, "tokens_per_prompt": outputs}


def until_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens


def run_sweep(model: Any, tokenizer: Any, config: GenerationSettings, requests: list, args: argparse.Namespace) -> list:
    """Engine settings timed back-to-back, `repeats` rounds, interleaved so that load drifts hit all alike.
    Unnamed settings are the engine's defaults (row prefill on CPU, static cache, shared prefix >= 16 tokens)."""
    plain = {"row_prefill": False, "static_cache": False, "share_prefix_min": 0}  # batched model.generate
    settings = [
        *({"batch_size": b} for b in (8, 16, 32)),
        *({"batch_size": b, **plain} for b in (16, 32)),
        {"batch_size": 32, "row_prefill": False},
        {"batch_size": 32, "static_cache": False},
        {"batch_size": 32, "static_cache": True},
        {"batch_size": 32, "share_prefix_min": 0},
    ]
    best: dict[int, float] = {}
    for _ in range(args.repeats):
        for i, setting in enumerate(settings):
            options = {k: v for k, v in setting.items() if k != "batch_size"}  # generation.transformers fields
            batch = config.model_copy(update={"batch_size": setting["batch_size"]})
            engine = TransformersGenerator(model, tokenizer, batch, **options)
            run = run_engine(engine, requests)
            best[i] = max(best.get(i, 0.0), run["tok_s"])
    return [{**s, "tok_s": best[i]} for i, s in enumerate(settings)]


def matmul_gflops(model: Any, rows: int = 256, seconds: float = 0.5) -> float:
    """Best GFLOP/s (model's dtype and device) over its matmuls at `rows` rows (compute bound): each weight shape is
    timed on its own (best of repeated runs, so that a busy machine does not lower it), then combined with the
    weight each shape has in one generated token: a decoder layer's linears x layers, plus the LM head."""
    linears = [m.weight.shape for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    counts: dict[tuple[int, int], int] = {}
    for shape in [*linears * model.config.num_hidden_layers, model.lm_head.weight.shape]:
        counts[tuple(shape)] = counts.get(tuple(shape), 0) + 1
    flops = seconds_per_token = 0.0
    for (n, k), count in counts.items():
        a = torch.randn(rows, k, device=model.device, dtype=model.dtype)
        b = torch.randn(k, n, device=model.device, dtype=model.dtype)
        best, deadline = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < deadline or best == float("inf"):
            synchronize(model.device)
            start = time.perf_counter()
            for _ in range(REPEATS_PER_TIMING):
                torch.mm(a, b)
            synchronize(model.device)
            best = min(best, (time.perf_counter() - start) / REPEATS_PER_TIMING)
        flops += 2.0 * n * k * count
        seconds_per_token += count * best / rows
    return flops / seconds_per_token / 1e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flop_counts(model: Any) -> dict[str, float]:
    """2 FLOPs per weight per token: decoder linear layers (prefill and decode) and the LM head (decode only;
    generate computes the prompt's logits at its last position only)."""
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    head = model.lm_head.weight.numel()
    return {
        "decoder_linear_params": linear,
        "lm_head_params": head,
        "decode_flops_per_token": 2.0 * (linear + head),
        "prefill_flops_per_token": 2.0 * linear,
    }


def print_table(report: dict[str, Any]) -> None:
    w = report["workload"]
    print(
        f"\n{w['prompts']} prompts from {w['source']} (mean {w['mean_prompt_tokens']:.0f} prompt tokens), "
        f"{w['max_new_tokens']} new tokens, {report['machine']['torch_threads']} threads, "
        f"load average {report['machine']['load_average_before']:.1f} -> {report['machine']['load_average_after']:.1f}"
    )
    rows = [
        ("naive loop (generate per prompt)", report["naive_tok_s"]),
        (f"engine (defaults, batch {w['batch_size']})", report["engine_tok_s"]),
        ("workload roofline (prefill + decode FLOPs)", report["workload_roofline_tok_s"]),
        (f"decode roofline ({report['matmul_gflops']:.0f} GFLOP/s)", report["roofline_tok_s"]),
    ]
    print(f"{'method':48s} {'tok/s':>9s} {'x naive':>8s} {'of roofline':>12s}")
    for name, value in rows:
        print(f"{name:48s} {value:9.1f} {value / report['naive_tok_s']:8.2f} {value / report['roofline_tok_s']:12.1%}")
    for s in report["sweep"]:
        name = "  sweep: " + ", ".join(f"{k}={v}" for k, v in s.items() if k != "tok_s")
        print(f"{name:48s} {s['tok_s']:9.1f} {s['tok_s'] / report['naive_tok_s']:8.2f}")
    print(f"workload_roofline_fraction={report['workload_roofline_fraction']:.3f}")
    print(f"greedy_identical_prompts={report['greedy_identical_prompts']}/{w['prompts']}")
    print(f"speedup_vs_naive={report['speedup_vs_naive']:.2f}")
    print(f"roofline_fraction={report['roofline_fraction']:.3f}")
    print(f"greedy_identical={'true' if report['greedy_identical'] else 'false'}")


if __name__ == "__main__":
    main()
