"""Precision by measured quality: the same model answers the same ESConv valid contexts in fp32 and in bf16.

Issue 13 asks whether generation may run in bf16 on CPUs with native bf16 (AVX512-BF16 or AMX), where it is several
times faster. Bit-identity with fp32 is the wrong test (greedy replies diverge after the first near-tie); the right
one is whether quality moves. This script generates greedy replies to N contexts with one model in both dtypes
(evaluation's own code: `pipeline.evaluation.generate_responses`), scores both with the project's evaluation
(`score_table`: every metric of the config's eval section, paired bootstrap CIs of bf16 - fp32 per context), and
reports, per metric, the difference, its CI and whether the CI holds 0; plus the share of identical replies, the
mean reply length in each dtype and the generation time of each.

    .venv/bin/python benchmarks/precision.py --model runs/quickstart/m0 --contexts 200
    .venv/bin/python benchmarks/precision.py --contexts 40            # the backbone, a quick look

Output: benchmarks/results/precision.json (no dataset text: metric values and counts only), ending with
`metrics_outside_ci=` (the metrics whose CI of bf16 - fp32 excludes 0) and `identical_replies=`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from esc_evolve.config import load_config
from esc_evolve.evaluation.responses import read_rows
from esc_evolve.pipeline.evaluation import (
    GENERATION_TIME_FILE,
    eval_contexts,
    generate_responses,
    read_eval_table,
    score_table,
)
from esc_evolve.training.settings import cpu_has_native_bf16

ESCONV_VALID = Path(os.environ.get("ESC_EVOLVE_SHARED_DATA", "../shared/data")) / "esconv" / "valid.jsonl"
RESULTS = Path(__file__).parent / "results" / "precision.json"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def main() -> None:
    args = parse_args()
    overrides = [f"eval.max_contexts={args.contexts}", "eval.judge.backend=none", *args.set]
    if ESCONV_VALID.is_file():
        overrides.append(f"data.valid_path={ESCONV_VALID}")
    config = load_config(args.config, overrides)
    samples = eval_contexts(config)
    adapter = Path(args.model) if args.model and Path(args.model).is_dir() else None
    model = config.model if adapter or not args.model else config.model.model_copy(update={"name": args.model})
    with tempfile.TemporaryDirectory() as tmp:
        responses = Path(tmp) / "responses.jsonl"
        for name, dtype in DTYPES.items():
            settings = model.model_copy(update={"dtype": dtype, "device": "cpu"})
            generate_responses(
                settings,
                config.generation,
                config.data.system_prompt,
                samples,
                {name: adapter},
                responses,
                seed=config.run.seed,
            )
        times = json.loads((Path(tmp) / GENERATION_TIME_FILE).read_text())
        rows = {(r.model, r.sample_id): r.response for r in read_rows(responses)}
        table = read_eval_table(responses, samples, list(DTYPES), include_human=False)
        result = score_table(table, config, None)
    report = summary(result, rows, samples, times, args, config)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for name, row in report["metrics"].items():
        flag = "OUTSIDE CI" if row["significant"] else "within CI"
        print(
            f"{name:<40} fp32 {row['fp32']:.4f}  bf16 {row['bf16']:.4f}  diff {row['diff']:+.4f} "
            f"[{row['low']:+.4f}, {row['high']:+.4f}]  {flag}"
        )
    print(f"generation seconds: fp32 {times['fp32']['seconds']:.0f}, bf16 {times['bf16']['seconds']:.0f}")
    print(f"results in {args.out}")
    print(f"metrics_outside_ci={report['metrics_outside_ci']}")
    print(f"identical_replies={report['identical_replies']}")


def summary(result: Any, rows: dict, samples: list, times: dict, args: argparse.Namespace, config: Any) -> dict:
    """Per metric: both values, bf16 - fp32 with its paired CI; replies identical; lengths; times; machine."""
    metrics = {}
    for sub in result.submetrics:
        diff = result.difference("bf16", "fp32", sub.name)
        sign = 1.0
        if diff is None:
            diff, sign = result.difference("fp32", "bf16", sub.name), -1.0
        if diff is None:
            continue
        low, high = sorted((sign * diff.interval.low, sign * diff.interval.high))
        metrics[sub.name] = {
            "fp32": result.estimates["fp32"][sub.name].value,
            "bf16": result.estimates["bf16"][sub.name].value,
            "diff": sign * diff.interval.value,
            "low": low,
            "high": high,
            "significant": diff.significant,
        }
    ids = [s.sample_id for s in samples]
    same = sum(rows[("fp32", i)] == rows[("bf16", i)] for i in ids)
    words = {m: sum(len(rows[(m, i)].split()) for i in ids) / len(ids) for m in DTYPES}
    return {
        "machine": {
            "cpu": cpu_model(),
            "native_bf16": cpu_has_native_bf16(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "load_average_before_scoring": os.getloadavg()[0],
        },
        "workload": {
            "model": args.model or config.model.name,
            "contexts": len(ids),
            "conversations": result.n_conversations,
            "source": config.data.valid_path,
            "max_new_tokens": config.generation.max_new_tokens,
            "decoding": "greedy" if config.generation.temperature == 0 else f"T={config.generation.temperature}",
        },
        "generation_seconds": {m: times[m]["seconds"] for m in DTYPES},
        "mean_words": words,
        "identical_replies": f"{same}/{len(ids)}",
        "metrics": metrics,
        "metrics_outside_ci": [name for name, row in metrics.items() if row["significant"]],
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="A run's m0/ or iterN/mN/ folder, or a backbone alias (default: the config's).")
    parser.add_argument("--config", type=Path, default=Path("configs/esconv-cpu.yaml"))
    parser.add_argument("--contexts", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], help="A config override KEY=VALUE (repeatable).")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
