"""SFT training throughput on one machine, in one process: trl's defaults vs ours vs the LoRA roofline.

Variants, on the same turn samples, backbone, LoRA settings and batch size:
  trl_defaults  trl's SFTTrainer as it comes (bf16=True, gradient checkpointing on; bf16 is emulated on CPU)
  trl_fp32      the same with bf16 and gradient checkpointing off (shows what the rest of ours adds)
  ours          esc-evolve's trainer as `esc-evolve sft` builds it (device defaults, length-grouped batches,
                LM head scored only where there are labels, LoRA inputs left in the autocast dtype)
Roofline: the best measured matmul GFLOP/s divided by 4 x parameters FLOPs per token (forward 2P plus
activation gradients 2P; the frozen weights need no weight gradients, the LoRA ones are negligible). It is taken
in the precision our variant trains in: fp32, or bf16 where bf16 autocast is on (CPUs with AVX512-BF16/AMX run
bf16 matmuls ~4x faster than fp32, so an fp32 roofline would be beaten by bf16 training). The fraction of the
fp32 roofline is in the JSON too.

Throughput counts non-padding tokens (prompt and response) of the measured steps; the first step of each variant
is a warm-up and is not measured. Results go to benchmarks/results/sft_throughput.json; the last two lines
printed are `speedup_vs_trl_defaults=<x>` and `roofline_fraction=<y>`.

    .venv/bin/python benchmarks/sft_throughput.py            # ~5 min on a quiet 2-core CPU
    .venv/bin/python benchmarks/sft_throughput.py --threads 1 --steps 6 --trl-steps 2
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from esc_evolve.config import ExperimentConfig, load_config
from esc_evolve.training.data import build_sft_rows
from esc_evolve.training.settings import lora_config, resolve_runtime
from esc_evolve.training.sft import build_trainer
from esc_evolve.training.speed import fast_paths

ROOT = Path(__file__).resolve().parents[1]
ESCONV = ROOT.parent / "shared" / "data" / "esconv" / "train.jsonl"


class StepTimer(TrainerCallback):
    """Seconds and non-padding tokens of every optimizer step."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.tokens: list[int] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.begin, self.seen = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds.append(time.perf_counter() - self.begin)
        self.tokens.append(state.num_input_tokens_seen - self.seen)


def bench_config(args: argparse.Namespace) -> ExperimentConfig:
    data = args.data or (str(ESCONV) if ESCONV.is_file() else "builtin:train")
    overrides = [
        f"data.train_path={data}",
        "data.valid_path=null",
        "sft.eval_fraction=0",
        f"data.context_window={args.context_window}",
        f"sft.max_train_samples={args.samples}",
        f"sft.per_device_batch_size={args.batch_size}",
        "model.device=cpu",
        "sft.save_steps=100000",
        "sft.logging_steps=1",
    ]
    return load_config(None, overrides)


def run_variant(name: str, config: ExperimentConfig, rows: Any, steps: int, work: Path) -> dict[str, Any]:
    timer = StepTimer()
    config = config.model_copy(deep=True)
    config.sft.max_steps = steps
    if name == "ours":
        runtime = resolve_runtime(config.model, config.sft)
        trainer = build_trainer(config.sft, config.model, rows, runtime, config.run.seed, work / name, [timer])
        with fast_paths(trainer, runtime):
            trainer.train()
    else:
        trainer = trl_trainer(config, rows, steps, work / name, timer, defaults=name == "trl_defaults")
        trainer.train()
    seconds, tokens = timer.seconds[1:], timer.tokens[1:]  # the first step warms up allocators and caches
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "measured_steps": len(seconds),
        "seconds_per_step": round(sum(seconds) / len(seconds), 3),
        "median_seconds_per_step": round(sorted(seconds)[len(seconds) // 2], 3),  # robust to a busy machine
        "tokens_per_step": round(sum(tokens) / len(tokens), 1),
        "tokens_per_second": round(sum(tokens) / sum(seconds), 2),
        "samples_per_second": round(len(seconds) * config.sft.per_device_batch_size / sum(seconds), 3),
        "step_seconds": [round(s, 3) for s in timer.seconds],
        "losses": [round(x, 4) for x in losses],
        "bf16": bool(trainer.args.bf16),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
    }
    print(f"{name}: {result['tokens_per_second']} tokens/s, {result['seconds_per_step']} s/step", flush=True)
    return result


def trl_trainer(config: ExperimentConfig, rows: Any, steps: int, out: Path, timer: Any, defaults: bool) -> Any:
    """trl's SFTTrainer with its defaults; only what the comparison needs is set (same batch, data, LoRA)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from esc_evolve.models import load_tokenizer, resolve_backbone

    extra = {} if defaults else {"bf16": False, "gradient_checkpointing": False}
    args = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=config.sft.per_device_batch_size,
        learning_rate=config.sft.learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        include_num_input_tokens_seen="non_padding",  # measurement only
        use_cpu=not torch.cuda.is_available(),  # trl refuses bf16 on CPU unless told it is on CPU
        seed=config.run.seed,
        **extra,
    )
    return SFTTrainer(
        model=resolve_backbone(config.model.name, config.model.cache_dir),
        args=args,
        train_dataset=Dataset.from_list(rows.train),
        processing_class=load_tokenizer(config.model),
        peft_config=lora_config(config.sft.lora, "llama"),
        callbacks=[timer],
    )


def matmul_gflops(dtype: torch.dtype, seconds: float = 1.5) -> dict[str, float]:
    """GEMM GFLOP/s on a large square product and on the backbone's own layer shapes."""
    shapes = [(2048, 2048, 2048), (1024, 576, 1536), (1024, 1536, 576)]
    rates = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            a @ b
            runs += 1
        rates[f"{m}x{k}x{n}"] = round(2 * m * k * n * runs / (time.perf_counter() - start) / 1e9, 2)
    return rates


def backbone_parameters(config: ExperimentConfig) -> int:
    from transformers import AutoModelForCausalLM

    from esc_evolve.models import resolve_backbone

    model = AutoModelForCausalLM.from_pretrained(resolve_backbone(config.model.name, config.model.cache_dir))
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once: they are the LM head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="Turn-sample source (default: ESConv train if present, else builtin:train).")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--context-window", type=int, default=2, help="Short examples keep the run short.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=11, help="Steps of ours (the first is a warm-up).")
    parser.add_argument("--trl-steps", type=int, default=5, help="Steps of each trl variant (slower).")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core).")
    parser.add_argument("--skip-trl-fp32", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sft_throughput.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = bench_config(args)
    rows = build_sft_rows(config.sft, config.data, config.model, config.run.seed)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["ours"] = run_variant("ours", config, rows, args.steps, Path(tmp))
        if not args.skip_trl_fp32:
            results["trl_fp32"] = run_variant("trl_fp32", config, rows, args.trl_steps, Path(tmp))
        results["trl_defaults"] = run_variant("trl_defaults", config, rows, args.trl_steps, Path(tmp))
    params = backbone_parameters(config)
    gflops = {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}
    rooflines = {dtype: max(rates.values()) * 1e9 / (4 * params) for dtype, rates in gflops.items()}
    # The roofline of the precision our variant trained in: with bf16 autocast the matmuls run at bf16 speed,
    # and an fp32 roofline would overstate the fraction (above 1 on CPUs with native bf16).
    precision = "bfloat16" if results["ours"]["bf16"] else "float32"
    roofline = rooflines[precision]
    ours = results["ours"]["tokens_per_second"]
    speedup = ours / results["trl_defaults"]["tokens_per_second"]
    fraction = ours / roofline
    report = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "data": {"source": config.data.train_path, "context_window": args.context_window, **rows.counts},
        "batch_size": args.batch_size,
        "variants": results,
        "roofline": {
            "matmul_gflops": gflops,
            "parameters": params,
            "flops_per_token": 4 * params,
            "tokens_per_second": {dtype: round(value, 2) for dtype, value in rooflines.items()},
            "precision_of_ours": precision,
            "fraction_of_fp32_roofline": round(ours / rooflines["float32"], 3),
        },
        "speedup_vs_trl_defaults": round(speedup, 2),
        "roofline_fraction": round(fraction, 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    best = max(gflops[precision].values())
    print(f"roofline ({precision}): {roofline:.1f} tokens/s ({best} GFLOP/s, {params / 1e6:.1f}M parameters)")
    print(f"results: {args.out}")
    print(f"speedup_vs_trl_defaults={speedup:.2f}")
    print(f"roofline_fraction={fraction:.3f}")


if __name__ == "__main__":
    main()
