"""The ESConv CPU pipeline on a fixed small slice, with yesterday's settings and with today's defaults, side by side.

Issue 13 asks for the speed of the whole loop, not of one kernel: this script runs `esc-evolve run` twice in one
invocation on the same slice (by default 16 contexts for one iteration, then evaluation of base, M0 and M1 on 32
ESConv valid contexts), both runs starting from one existing M0 (`run.m0_from`, so SFT is not timed), and reads the
wall time of every stage from each run's `stages.json`.

- `before`: the settings the speed issue started from (`BEFORE` below: fp32 generation, no prefix reuse inside a
  batch, the reference model scored at every DPO step).
- `after`: the config's values as they are now (today's defaults).

It prints the stage times of both and `speedup_pairs=`, `speedup_dpo=`, `speedup_eval=`, `speedup_total=`, and
writes benchmarks/results/pipeline.json with the CPU model, its bf16 flags, the torch version and thread count.

    .venv/bin/python benchmarks/pipeline.py --m0 runs/esconv-cpu              # ~15-25 min on 2 cores
    .venv/bin/python benchmarks/pipeline.py --m0 RUN --device cuda --out benchmarks/results/gpu/pipeline.json

The two runs go one after the other, so a busy machine can weigh on one more than the other: run it on a quiet
machine (the load average before each run is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from esc_evolve.config import load_config
from esc_evolve.pipeline.stages import run_pipeline
from esc_evolve.training.settings import cpu_has_native_bf16

ESCONV = Path(os.environ.get("ESC_EVOLVE_SHARED_DATA", "../shared/data")) / "esconv"
RESULTS = Path(__file__).parent / "results" / "pipeline.json"
# The settings each speed-up of issue 13 replaced; every other key is the config's own value in both runs.
BEFORE = (
    "model.dtype=float32",
    "generation.transformers.share_prefix_min=0",
    "dpo.precompute_ref_log_probs=false",
)
STAGE_GROUPS = {"pairs": ".pairs", "dpo": ".dpo", "eval": "eval"}


def main() -> None:
    args = parse_args()
    root = Path(tempfile.mkdtemp(prefix="pipeline-bench-", dir=args.work_dir))
    modes = {"before": list(BEFORE), "after": []}
    report: dict[str, Any] = {"machine": machine(), "workload": workload(args), "modes": {}}
    try:
        for mode, overrides in modes.items():
            report["modes"][mode] = timed_run(args, root, mode, overrides)
            print_stages(mode, report["modes"][mode]["stages"])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report["speedups"] = speedups(report["modes"]["before"]["groups"], report["modes"]["after"]["groups"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"results in {args.out}" + (f"; runs kept in {root}" if args.keep else ""))
    for name, value in report["speedups"].items():
        print(f"speedup_{name}={value}")


def timed_run(args: argparse.Namespace, root: Path, mode: str, overrides: list[str]) -> dict[str, Any]:
    """One `esc-evolve run` of the slice in `root/mode`; its stage times, grouped."""
    config = load_config(args.config, [*slice_overrides(args, root, mode), *overrides, *args.set])
    load = os.getloadavg()[0]
    run_dir = run_pipeline(config)
    stages = {name: entry["wall_seconds"] for name, entry in json.loads((run_dir / "stages.json").read_text()).items()}
    return {
        "overrides": overrides,
        "resolved": {"dtype": config.model.dtype, "share_prefix_min": config.generation.transformers.share_prefix_min},
        "load_average_before": round(load, 2),
        "stages": stages,
        "groups": group_stages(stages),
    }


def slice_overrides(args: argparse.Namespace, root: Path, mode: str) -> list[str]:
    data = [f"data.train_path={ESCONV / 'train.jsonl'}", f"data.valid_path={ESCONV / 'valid.jsonl'}"]
    return [
        *(data if ESCONV.is_dir() else []),
        f"run.output_dir={root}",
        f"run.name={mode}",
        f"run.m0_from={args.m0}",
        f"model.device={args.device}",
        f"evolve.iterations={args.iterations}",
        f"evolve.contexts_per_iteration={args.contexts}",
        f"eval.max_contexts={args.eval_contexts}",
        f"eval.models=[{','.join(['base', 'm0', *(f'm{i}' for i in range(1, args.iterations + 1))])}]",
        "eval.judge.backend=none",
    ]


def group_stages(stages: dict[str, float]) -> dict[str, float]:
    """Seconds per group (all iterations' pairs, all DPOs, evaluation) and the total of every stage timed."""
    groups = {
        group: round(sum(s for name, s in stages.items() if name.endswith(suffix) or name == suffix), 2)
        for group, suffix in STAGE_GROUPS.items()
    }
    groups["total"] = round(sum(stages.values()), 2)
    return groups


def speedups(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: round(before[name] / after[name], 2) if after.get(name) else None for name in before}


def print_stages(mode: str, stages: dict[str, float]) -> None:
    print(f"{mode}: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stages.items()))


def machine() -> dict[str, Any]:
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "native_bf16": cpu_has_native_bf16(),
        "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
    }


def workload(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "config": str(args.config),
        "m0_from": str(args.m0),
        "iterations": args.iterations,
        "contexts_per_iteration": args.contexts,
        "eval_contexts": args.eval_contexts,
        "data": str(ESCONV) if ESCONV.is_dir() else "the config's",
        "before_overrides": list(BEFORE),
        "extra_overrides": args.set,
    }


def cpu_model() -> str:
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_flags() -> set[str]:
    for line in _cpuinfo():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpuinfo() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text().splitlines() if path.is_file() else []


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m0", type=Path, required=True, help="A run directory (its m0/) or an M0 adapter folder.")
    parser.add_argument("--config", type=Path, default=Path("configs/esconv-cpu.yaml"))
    parser.add_argument("--contexts", type=int, default=16, help="Contexts per iteration.")
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--eval-contexts", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], help="A config override for both runs (repeatable).")
    parser.add_argument("--work-dir", type=Path, default=None, help="Where the two runs go (default: a temp dir).")
    parser.add_argument("--keep", action="store_true", help="Keep the two run directories.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
