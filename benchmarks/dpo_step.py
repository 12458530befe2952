"""Where a DPO step goes, before and after the speed defaults, and DPO's time per trained token against SFT's.

On the default backbone (SmolLM2-135M-Instruct) with the default DPO settings (2 pairs per micro-batch, 2
accumulation steps, LoRA r16 on every linear layer), on preference pairs built from turn samples (ESConv train if
present, else the packaged conversations; context window 8, ~280 tokens of prompt + reply): `chosen` is the
human reply, `rejected` the reply of another sample, so both sides have real lengths. M_t is the backbone with a
zero LoRA adapter (a fresh M0), so DPO and SFT start from the same weights.

Variants, run one after the other in one process on the same pairs:
  before  DPO as it was: reference scored inside every step, random batches, sdpa attention, the LM head on every
          position, LoRA inputs cast to fp32 (bf16 autocast and bf16 weights as now: they were there already)
  after   DPO as `esc-evolve dpo` trains now (training/dpo.py): the defaults `dpo.precompute_ref_log_probs` and
          `dpo.group_by_length`, SFT's fast paths
  sft     SFT (`esc-evolve sft`'s trainer) on the same rows: prompt + chosen and prompt + rejected as samples, the
          same 8 rows per optimiser step

Each DPO step is split into: collation (the collator, padding included), policy forward, reference forward
(no-grad forwards inside the step), backward, optimiser (clip, step, schedule), and the rest (data loading,
metrics, callbacks). The precomputed reference pass runs while the trainer is built; it is timed there and
charged per token, as one pass per epoch (`--epochs`, default 1, the worst case: with 3 epochs it is a third).
Tokens are non-padding tokens of the chosen and rejected rows (the prompt counts once per row, as SFT counts it);
the padding share is of the padded batch. The first step of each variant is a warm-up and is not measured.

    .venv/bin/python benchmarks/dpo_step.py --threads 1           # before, after, sft: 6 min on a shared 2-core CPU
    .venv/bin/python benchmarks/dpo_step.py --threads 1 --mode after

Results: benchmarks/results/dpo_step.json; the last lines printed are `speedup_after_vs_before=<x>` and
`dpo_vs_sft_time_per_token=<y>` (after; the issue's target is at most 2).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from esc_evolve.config import DPOSettings, ExperimentConfig, load_config
from esc_evolve.training.data import SFTRows, build_sft_rows
from esc_evolve.training.dpo import build_dpo_trainer
from esc_evolve.training.settings import resolve_runtime
from esc_evolve.training.sft import build_trainer
from esc_evolve.training.speed import compact_lm_head_on_cpu, fast_paths

ROOT = Path(__file__).resolve().parents[1]
ESCONV = ROOT.parent / "shared" / "data" / "esconv" / "train.jsonl"
PARTS = ("collation", "policy_forward", "reference_forward", "backward", "optimizer")
# The settings DPO trained with before this benchmark's changes; `before` restores them.
BEFORE = {"dpo.precompute_ref_log_probs": "false", "dpo.group_by_length": "false", "model.attn_implementation": "sdpa"}


class Clock:
    """Seconds per named part, per optimiser step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = defaultdict(float)
        self.tokens: list[int] = []
        self.padded: list[int] = []
        self.step_tokens = self.step_padded = 0

    def add(self, part: str, seconds: float) -> None:
        self.current[part] += seconds

    def wrap(self, part: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(part, time.perf_counter() - start)

        return timed

    def count(self, batch: dict[str, Any]) -> None:
        self.step_tokens += int(batch["attention_mask"].sum())
        self.step_padded += batch["attention_mask"].numel()

    def close_step(self, seconds: float) -> None:
        self.steps.append({**self.current, "step": seconds})
        self.tokens.append(self.step_tokens)
        self.padded.append(self.step_padded)
        self.current, self.step_tokens, self.step_padded = defaultdict(float), 0, 0


class StepParts(TrainerCallback):
    """Closes the clock's step at each optimiser step; times the optimiser between its two callbacks."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.begin = time.perf_counter()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.optimizer_begin = time.perf_counter()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.clock.add("optimizer", time.perf_counter() - self.optimizer_begin)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.clock.close_step(time.perf_counter() - self.begin)


def instrument(trainer: Any, clock: Clock) -> None:
    """Time the collator, each forward (no-grad ones are the reference's) and the backward of `trainer`."""
    collator = trainer.data_collator

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        start = time.perf_counter()
        batch = collator(examples)
        clock.add("collation", time.perf_counter() - start)
        clock.count(batch)
        return batch

    trainer.data_collator = collate
    trainer.accelerator.backward = clock.wrap("backward", trainer.accelerator.backward)
    for model in filter(None, (trainer.model, getattr(trainer, "ref_model", None))):
        time_forwards(model, clock)
    trainer.add_callback(StepParts(clock))


def time_forwards(model: torch.nn.Module, clock: Clock) -> None:
    """Forwards with gradients are the policy's; no-grad ones inside a step are the reference's."""
    starts: list[float] = []

    def finished(*_: Any) -> None:
        part = "policy_forward" if torch.is_grad_enabled() else "reference_forward"
        clock.add(part, time.perf_counter() - starts.pop())

    model.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    model.register_forward_hook(finished)


@contextmanager
def timed_reference_pass(seconds: list[float]) -> Iterator[None]:
    """Time trl's precomputed reference pass, which runs inside `DPOTrainer.__init__`."""
    from trl import DPOTrainer

    original = DPOTrainer._precompute_ref_logps

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    DPOTrainer._precompute_ref_logps = timed
    try:
        yield
    finally:
        DPOTrainer._precompute_ref_logps = original


def bench_config(args: argparse.Namespace, extra: dict[str, str] | None = None) -> ExperimentConfig:
    data = args.data or (str(ESCONV) if ESCONV.is_file() else "builtin:train")
    overrides = {
        "data.train_path": data,
        "data.valid_path": "null",
        "data.context_window": str(args.context_window),
        "sft.eval_fraction": "0",
        "sft.max_train_samples": str(pairs_for(args.steps) + 1),
        "model.device": "cpu",
        "dpo.max_steps": str(args.steps),
        "dpo.save_steps": "100000",
        "dpo.logging_steps": "1",
        **(extra or {}),
    }
    return load_config(None, [f"{key}={value}" for key, value in overrides.items()])


def pairs_for(steps: int) -> int:
    """One epoch's worth of pairs: the reference pass scores exactly the pairs the steps train on."""
    dpo = DPOSettings()
    return steps * dpo.per_device_batch_size * dpo.gradient_accumulation_steps


def build_pairs(config: ExperimentConfig) -> list[dict[str, Any]]:
    """Turn samples as pairs: chosen = the sample's reply, rejected = the next sample's reply."""
    rows = build_sft_rows(config.sft, config.data, config.model, config.run.seed).train
    pairs = [
        {"prompt": row["prompt"], "chosen": row["completion"], "rejected": other["completion"]}
        for row, other in zip(rows, rows[1:], strict=False)
    ]
    return pairs[: pairs_for(config.dpo.max_steps)]


def make_parent(config: ExperimentConfig, folder: Path) -> Path:
    """A fresh M0: the backbone with a zero LoRA adapter (peft's default init), saved with its lineage."""
    from peft import LoraConfig, get_peft_model

    from esc_evolve.models import load_model
    from esc_evolve.models.lineage import write_lineage

    backbone, _ = load_model(config.model)
    get_peft_model(backbone, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    write_lineage(folder, config.model.name, None)
    return folder


def run_dpo(name: str, config: ExperimentConfig, pairs: list[dict[str, Any]], parent: Path, work: Path) -> Any:
    """Build and train one DPO variant as train_dpo does (`after`), or without the fast paths (`before`)."""
    clock, reference_pass = Clock(), []
    runtime = resolve_runtime(config.model, config.dpo)
    with ExitStack() as stack:
        stack.enter_context(timed_reference_pass(reference_pass))
        if name == "after":
            stack.enter_context(compact_lm_head_on_cpu())  # as train_dpo: on while trl precomputes the reference
        started = time.perf_counter()
        trainer = build_dpo_trainer(config.dpo, config.model, pairs, runtime, parent, config.run.seed, work / name, [])
        build_seconds = time.perf_counter() - started
        instrument(trainer, clock)
        if name == "after":
            stack.enter_context(fast_paths(trainer, runtime))
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = summarise(clock, losses)
    result["build_seconds"] = round(build_seconds, 2)
    result["reference_pass_seconds"] = round(sum(reference_pass), 2)
    result["dataset_tokens"] = dataset_tokens(trainer.train_dataset, config.dpo.max_length)
    if trainer.args.precompute_ref_log_probs:
        result["reference_pass_padding_share"] = pass_padding(trainer, config.dpo.per_device_batch_size)
    result["settings"] = {
        "precompute_ref_log_probs": trainer.args.precompute_ref_log_probs,
        "train_sampling_strategy": trainer.args.train_sampling_strategy,
        "attention": trainer.model.config._attn_implementation,
        "bf16": bool(trainer.args.bf16),
        "weights_dtype": str(trainer.model.get_base_model().dtype).removeprefix("torch."),
        "fast_paths": name == "after",
    }
    print(f"dpo {name}: {result['tokens_per_second']} tokens/s, {result['seconds_per_step']} s/step", flush=True)
    return result


def pass_padding(trainer: Any, batch_size: int) -> dict[str, float]:
    """Padding share of the reference pass's batches: sorted by length (ours) and in dataset order (trl's)."""
    from esc_evolve.training.dpo import pair_lengths

    lengths = pair_lengths(trainer.train_dataset, trainer.args.max_length)
    tokens = dataset_tokens(trainer.train_dataset, trainer.args.max_length)

    def share(order: list[int]) -> float:
        batches = [
            [lengths[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)
        ]
        return round(1 - tokens / sum(2 * len(batch) * max(batch) for batch in batches), 3)

    return {
        "sorted": share(sorted(range(len(lengths)), key=lengths.__getitem__)),
        "dataset_order": share(list(range(len(lengths)))),
    }


def dataset_tokens(dataset: Any, max_length: int) -> int:
    """Non-padding tokens of every chosen and rejected row, as the collator truncates them."""
    columns = zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
    return sum(min(len(p) + len(c), max_length) + min(len(p) + len(r), max_length) for p, c, r in columns)


def run_sft(config: ExperimentConfig, pairs: list[dict[str, Any]], work: Path, steps: int) -> dict[str, Any]:
    """SFT as `esc-evolve sft` trains, on the rows of the pairs, 8 rows per optimiser step like DPO's 2 x 2 pairs."""
    rows = [{"prompt": p["prompt"], "completion": p[side]} for p in pairs for side in ("chosen", "rejected")]
    sft = config.sft.model_copy(
        update={
            "max_steps": steps,
            "per_device_batch_size": 2 * config.dpo.per_device_batch_size,
            "gradient_accumulation_steps": config.dpo.gradient_accumulation_steps,
            "max_length": config.dpo.max_length,
            "save_steps": 100000,
            "logging_steps": 1,
        }
    )
    runtime = resolve_runtime(config.model, sft)
    clock = Clock()
    trainer = build_trainer(sft, config.model, SFTRows(rows, [], {}), runtime, config.run.seed, work / "sft", [])
    instrument(trainer, clock)
    with fast_paths(trainer, runtime):
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = summarise(clock, losses)
    print(f"sft: {result['tokens_per_second']} tokens/s, {result['seconds_per_step']} s/step", flush=True)
    return result


def summarise(clock: Clock, losses: list[float]) -> dict[str, Any]:
    steps, tokens, padded = clock.steps[1:], clock.tokens[1:], clock.padded[1:]  # the first step warms up
    seconds = sum(step["step"] for step in steps)
    parts = {part: sum(step.get(part, 0.0) for step in steps) / len(steps) for part in PARTS}
    mean_step = seconds / len(steps)
    parts["other"] = mean_step - sum(parts.values())
    return {
        "measured_steps": len(steps),
        "seconds_per_step": round(mean_step, 3),
        "median_seconds_per_step": round(sorted(s["step"] for s in steps)[len(steps) // 2], 3),
        "parts_seconds_per_step": {part: round(value, 3) for part, value in parts.items()},
        "parts_share": {part: round(value / mean_step, 3) for part, value in parts.items()},
        "tokens_per_step": round(sum(tokens) / len(tokens), 1),
        "padding_share": round(1 - sum(tokens) / max(sum(padded), 1), 3),
        "tokens_per_second": round(sum(tokens) / seconds, 2),
        "step_seconds": [round(step["step"], 3) for step in clock.steps],
        "losses": [round(x, 4) for x in losses],
    }


def with_reference_pass(result: dict[str, Any], epochs: float) -> float:
    """Tokens/s with the precomputed reference pass charged per token (one pass per `epochs` epochs)."""
    seconds_per_token = 1 / result["tokens_per_second"]
    if result["reference_pass_seconds"]:
        seconds_per_token += result["reference_pass_seconds"] / result["dataset_tokens"] / epochs
    return round(1 / seconds_per_token, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="Turn-sample source (default: ESConv train if present, else builtin:train).")
    parser.add_argument("--context-window", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="Steps per variant (the first is a warm-up).")
    parser.add_argument("--epochs", type=float, default=1.0, help="Epochs the reference pass is spread over.")
    parser.add_argument("--mode", choices=["both", "before", "after"], default="both")
    parser.add_argument("--skip-sft", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dpo_step.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = bench_config(args)
    pairs = build_pairs(config)
    names = ["before", "after"] if args.mode == "both" else [args.mode]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        parent = make_parent(config, Path(tmp) / "m0")
        for name in names:
            variant = bench_config(args, BEFORE if name == "before" else None)
            torch.manual_seed(0)
            results[name] = run_dpo(name, variant, pairs, parent, Path(tmp))
            results[name]["tokens_per_second_with_reference_pass"] = with_reference_pass(results[name], args.epochs)
        if not args.skip_sft:
            results["sft"] = run_sft(config, pairs, Path(tmp), args.steps)
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_name(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "data": {"source": config.data.train_path, "context_window": args.context_window, "pairs": len(pairs)},
        "dpo": {"per_device_batch_size": config.dpo.per_device_batch_size,
                "gradient_accumulation_steps": config.dpo.gradient_accumulation_steps,
                "max_length": config.dpo.max_length, "epochs_for_reference_pass": args.epochs},
        "variants": results,
        **ratios(results),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"results: {args.out}")
    for key, value in ratios(results).items():
        print(f"{key}={value}")


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """after vs before (tokens/s, reference pass included), and DPO's time per token over SFT's."""
    out = {}
    if "before" in results and "after" in results:
        before, after = (results[n]["tokens_per_second_with_reference_pass"] for n in ("before", "after"))
        out["speedup_after_vs_before"] = round(after / before, 2)
    if "sft" in results:
        for name in ("before", "after"):
            if name in results:
                dpo = results[name]["tokens_per_second_with_reference_pass"]
                out[f"dpo_vs_sft_time_per_token_{name}"] = round(results["sft"]["tokens_per_second"] / dpo, 2)
        last = "after" if "after" in results else "before"
        if last in results:
            out["dpo_vs_sft_time_per_token"] = out[f"dpo_vs_sft_time_per_token_{last}"]
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
