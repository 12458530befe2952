"""Where the time of `esc-evolve simulate` goes: one model's rollout, every generate call timed.

The rollout of `simulate` for one supporter (the backbone, or `--model ADAPTER`) with the config's local
simulator, on N packaged cards and T turns, as the command runs it (simulation.rollout.roll_out inside
`tuned_for_dialogues`). Per call: side, rows, prompt tokens, prompt tokens actually computed by the one-row
prefill (the rest came from kept dialogues or a shared prefix), new tokens, wall and CPU seconds, prefill CPU
seconds. CPU seconds with `--threads 1` are the stable measure on a shared machine (wall time there depends on
the other jobs). `--engine-before` runs the engine as it was before docs/simulation.md "Time": fp32 simulator,
batches of 16, nothing kept between calls, transformers' sorting top-p warper.

    .venv/bin/python benchmarks/simulate_time.py --cards 67 --turns 6 --threads 1     # ~13 min on one core
    .venv/bin/python benchmarks/simulate_time.py --cards 16 --turns 6 --threads 1 --engine-before

Output: benchmarks/results/simulate_time[-before].json (per call and totals; no text), `cpu_s_per_model=` and
the number of end ratings parsed; `--transcripts FILE` also writes the dialogues (JSONL, as transcripts.jsonl).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from esc_evolve.config import load_config
from esc_evolve.evaluation.settings import EvaluationSettings
from esc_evolve.generation import GenerationRequest, GenerationResult, Generator, build_generator, prefill
from esc_evolve.generation import hf as hf_backend
from esc_evolve.simulation import load_role_cards
from esc_evolve.simulation.rollout import Supporter, roll_out, select_cards, tuned_for_dialogues
from esc_evolve.simulation.scores import load_scoring_tools
from esc_evolve.simulation.simulator import build_simulator

RESULTS = Path(__file__).parent / "results"
PREFILL = {"cpu": 0.0, "tokens": 0}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    _count_prefill()
    overrides = [f"simulate.turns={args.turns}", *args.set]
    if args.engine_before:
        overrides += ["simulate.dtype=float32", "simulate.batch_size=16", "simulate.reuse_prompt_cache=false"]
        from transformers import TopPLogitsWarper

        hf_backend.TopPFilter = TopPLogitsWarper  # the sorting warper the engine used before
    config = load_config(args.config, overrides)
    cards = select_cards(load_role_cards(), args.cards, config.run.seed)
    tools = load_scoring_tools(EvaluationSettings.for_experiment(config))
    simulator = build_simulator(config.simulate, config.model, config.generation, seed=config.run.seed)
    seeker = Timed(simulator.generator, "seeker")
    simulator._generator = seeker  # the simulator's engine, timed
    supporter = Timed(build_generator(config.model, config.generation, args.model, seed=config.run.seed), "supporter")
    started, cpu = time.perf_counter(), time.process_time()
    with tuned_for_dialogues(config.simulate, len(cards), supporter, seeker):
        dialogues = roll_out(
            cards,
            Supporter("m", "m", lambda: supporter, config.data.system_prompt),
            supporter,
            simulator,
            tools.classify,
            turns=args.turns,
            seed=config.run.seed,
        )
    report(args, simulator.description, [supporter, seeker], time.perf_counter() - started, time.process_time() - cpu)
    print(f"ratings_parsed={sum(d.rating is not None and d.rating.status == 'ok' for d in dialogues)}/{len(dialogues)}")
    if args.transcripts:
        Path(args.transcripts).write_text("".join(d.model_dump_json() + "\n" for d in dialogues), encoding="utf-8")


class Timed(Generator):
    """A generator whose every call is timed (wall, CPU, prefill CPU and tokens computed)."""

    def __init__(self, inner: Generator, side: str) -> None:
        self.inner, self.side, self.calls = inner, side, []

    def tune(self, **settings: Any) -> None:
        self.inner.tune(**settings)

    def generate(self, requests: Sequence[GenerationRequest], progress: bool = True) -> list[GenerationResult]:
        before = dict(PREFILL)
        wall, cpu = time.perf_counter(), time.process_time()
        results = self.inner.generate(requests, progress=False)
        call = {
            "side": self.side,
            "rows": len(requests),
            "prompt_tokens": sum(r.prompt_tokens for r in results),
            "computed_tokens": PREFILL["tokens"] - before["tokens"],
            "new_tokens": sum(r.num_tokens for r in results),
            "wall_s": round(time.perf_counter() - wall, 2),
            "cpu_s": round(time.process_time() - cpu, 2),
            "prefill_cpu_s": round(PREFILL["cpu"] - before["cpu"], 2),
        }
        self.calls.append(call)
        print(json.dumps(call), flush=True)
        return results

    def close(self) -> None:
        self.inner.close()


def _count_prefill() -> None:
    """Count the tokens and CPU time of every one-row prefill forward (generation/prefill.py)."""
    forward = prefill._forward

    def counted(model: Any, cache_name: str, ids: Sequence[int], start: Any, upto: int | None = None) -> Any:
        cpu = time.process_time()
        cache = forward(model, cache_name, ids, start, upto)
        PREFILL["cpu"] += time.process_time() - cpu
        PREFILL["tokens"] += len(ids)
        return cache

    prefill._forward = counted


def report(args: argparse.Namespace, simulator: str, sides: list[Timed], wall: float, cpu: float) -> None:
    totals = {
        side.side: {key: round(sum(c[key] for c in side.calls), 2) for key in side.calls[0] if key != "side"}
        for side in sides
    }
    result = {
        "cards": args.cards,
        "turns": args.turns,
        "threads": args.threads,
        "engine_before": args.engine_before,
        "simulator": simulator,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads()},
        "calls": [c for side in sides for c in side.calls],
        "totals": totals,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    name = "simulate_time-before.json" if args.engine_before else "simulate_time.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(totals))
    print(f"cpu_s_per_model={cpu:.1f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--model", default=None, help="A LoRA adapter folder as the supporter (default: backbone).")
    parser.add_argument("--cards", type=int, default=16)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--engine-before", action="store_true", help="The engine before the speed-ups.")
    parser.add_argument("--transcripts", default=None, help="Also write the dialogues here (JSONL), to read them.")
    parser.add_argument("--set", action="append", default=[], help="Config override KEY=VALUE (repeatable).")
    return parser.parse_args()


if __name__ == "__main__":
    main()
