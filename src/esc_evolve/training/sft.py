"""Phase 1, experience acquisition: LoRA SFT of the backbone on ESC turns (+ replay) with trl, giving M0.

Run directory (`RUN/`):
- `sft-checkpoints/checkpoint-N/`: trainer checkpoints every `sft.save_steps` (the last two are kept), and
  `base_eval.json`, the untrained backbone's eval loss (computed once, reused on resume).
- `logs/tensorboard/sft/`: loss, learning rate, grad norm, tokens/s, eval loss before and after.
- `m0/`: the LoRA adapter, tokenizer and `train_summary.json`, published by renaming a finished folder.
- `m0-merged/`: with `sft.merge_adapter`, the backbone with the adapter merged in (loadable without peft).

Training resumes from the newest complete checkpoint whenever one exists: a run directory is only reopened
with `--resume`. The same entry point runs data-parallel under `accelerate launch` (see docs/sft.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from esc_evolve.config import ExperimentConfig
from esc_evolve.models.lineage import write_lineage
from esc_evolve.rundir import RunDir, write_json_atomic
from esc_evolve.training.data import SFTRows, build_sft_rows
from esc_evolve.training.settings import (
    Runtime,
    lora_config,
    model_init_kwargs,
    process_state,
    resolve_runtime,
    trl_sft_config,
)

log = logging.getLogger(__name__)

STAGE = "sft"
ADAPTER_DIR = "m0"
MERGED_DIR = "m0-merged"
CHECKPOINT_DIR = "sft-checkpoints"
SUMMARY_FILE = "train_summary.json"
BASE_EVAL_FILE = "base_eval.json"


def sft_stage(run: RunDir) -> dict[str, Any]:
    """Pipeline stage `sft`: train M0 into `run.path / "m0"` and return the training summary."""
    return run_sft(run)


def run_sft(run: RunDir, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train (or resume training) M0 for `run.config`; extra trainer `callbacks` are for tests and tools."""
    from esc_evolve.training.speed import ThroughputCallback, set_torch_threads

    config = run.config
    started = time.perf_counter()
    state = process_state(config)
    threads = set_torch_threads(config.sft.num_threads)
    runtime = resolve_runtime(config)
    rows = build_sft_rows(config)
    throughput = ThroughputCallback()
    trainer = build_trainer(config, rows, runtime, run.path, [throughput, *(callbacks or [])])
    outcome = train_and_evaluate(trainer, runtime, run.path / CHECKPOINT_DIR, state, has_eval=bool(rows.eval))
    summary = {
        "steps": trainer.state.global_step,
        **outcome,
        **throughput.summary(samples_per_step(config, state.num_processes)),
        "train_loss_last_logged": _last_logged_loss(trainer),
        **rows.counts,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "runtime": _runtime_info(runtime, threads, state.num_processes),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    save_adapter(trainer, run.path / ADAPTER_DIR, summary, state, config.model.name)
    if config.sft.merge_adapter and state.is_main_process:
        merge_adapter(config, run.path / ADAPTER_DIR, run.path / MERGED_DIR)
    state.wait_for_everyone()
    log.info("SFT done: eval loss %s (untrained backbone %s)", summary["eval_loss"], summary["base_eval_loss"])
    return summary


def train_and_evaluate(trainer: Any, runtime: Runtime, checkpoints: Path, state: Any, has_eval: bool) -> dict[str, Any]:
    """Eval the untrained model, train from the newest checkpoint if there is one, eval again."""
    from esc_evolve.training.speed import fast_paths

    with fast_paths(trainer, runtime):
        base_loss = base_eval_loss(trainer, checkpoints, state) if has_eval else None
        resume_from = latest_checkpoint(checkpoints)
        if resume_from:
            log.info("resuming SFT from %s", resume_from)
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        eval_loss = trainer.evaluate()["eval_loss"] if has_eval else None
    return {
        "resumed_from_step": _step_of(resume_from),
        "eval_loss": _round(eval_loss),
        "base_eval_loss": _round(base_loss),
        "train_loss_session_mean": _round(result.training_loss),
    }


def build_trainer(
    config: ExperimentConfig, rows: SFTRows, runtime: Runtime, run_path: Path, callbacks: list[Any]
) -> Any:
    from datasets import Dataset
    from transformers import AutoConfig
    from trl import SFTTrainer

    from esc_evolve.models import load_tokenizer, resolve_backbone

    source = resolve_backbone(config.model.name, config.model.cache_dir)
    args = trl_sft_config(config, run_path / CHECKPOINT_DIR, runtime)
    args.model_init_kwargs = model_init_kwargs(config, runtime)
    model_type = AutoConfig.from_pretrained(
        source, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code
    ).model_type
    tensorboard = tensorboard_callback(run_path, STAGE)
    return SFTTrainer(
        model=source,  # loaded by trl, so that DeepSpeed ZeRO-3 can shard it while it loads
        args=args,
        train_dataset=Dataset.from_list(rows.train),
        eval_dataset=Dataset.from_list(rows.eval) if rows.eval else None,
        processing_class=load_tokenizer(config.model),
        peft_config=lora_config(config.sft.lora, model_type),
        # Ours first: it adds tokens/s to the logs before TensorBoard writes them.
        callbacks=[*callbacks, *([tensorboard] if tensorboard else [])],
    )


def base_eval_loss(trainer: Any, checkpoints: Path, state: Any) -> float:
    """Eval loss before any training step: the LoRA B matrices start at zero, so this is the backbone's own."""
    file = checkpoints / BASE_EVAL_FILE
    if file.is_file():
        return json.loads(file.read_text(encoding="utf-8"))["eval_loss"]
    loss = trainer.evaluate()["eval_loss"]
    if state.is_main_process:
        write_json_atomic(file, {"eval_loss": loss})
    return loss


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest `checkpoint-N` whose trainer state was written (written last, so the folder is complete).

    transformers' `get_last_checkpoint` takes the highest number even if the save was interrupted.
    """
    complete = []
    for path in folder.glob("checkpoint-*"):
        step = _step_of(path)
        if step is not None and _readable_json(path / "trainer_state.json"):
            complete.append((step, path))
    return max(complete)[1] if complete else None


def save_adapter(trainer: Any, target: Path, summary: dict[str, Any], state: Any, base: str) -> None:
    """Save into a staging folder (all processes: sharded models gather there), then rename it into place."""
    staging = target.with_name(f".{target.name}.staging")
    if state.is_main_process and staging.exists():
        shutil.rmtree(staging)  # left by an interrupted save
    state.wait_for_everyone()
    trainer.save_model(str(staging))
    if state.is_main_process:
        write_json_atomic(staging / SUMMARY_FILE, summary)
        write_lineage(staging, base, None)  # M0's parent is the backbone itself
        publish(staging, target)
    state.wait_for_everyone()


def merge_adapter(config: ExperimentConfig, adapter: Path, target: Path) -> None:
    """Reload the backbone with the saved adapter and merge: independent of how training was sharded."""
    from esc_evolve.models import load_model

    model, tokenizer = load_model(config.model, adapter=adapter)
    merged = model.merge_and_unload()
    staging = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    publish(staging, target)
    log.info("merged model saved to %s", target)


def publish(staging: Path, target: Path) -> None:
    """Rename a finished folder into place; an older one is moved aside first and then deleted."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def samples_per_step(config: ExperimentConfig, processes: int) -> int:
    return config.sft.per_device_batch_size * config.sft.gradient_accumulation_steps * processes


def tensorboard_callback(run_path: Path, name: str) -> Any:
    """TensorBoard logs under RUN/logs/tensorboard/<name>/, written by the main process only."""
    from accelerate import PartialState

    if not PartialState().is_main_process:  # set up by run_sft
        return None
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    # The callback closes its writer when training ends and opens a new one for the final eval: both must go
    # here, not to its default under the checkpoint folder.
    callback.logging_dir = str(run_path / "logs" / "tensorboard" / STAGE)
    return callback


def _last_logged_loss(trainer: Any) -> float | None:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return _round(losses[-1]) if losses else None


def _runtime_info(runtime: Runtime, threads: int, processes: int) -> dict[str, Any]:
    return {
        "device": str(runtime.device),
        "dtype": str(runtime.dtype).removeprefix("torch."),
        "bf16": runtime.bf16,
        "fp16": runtime.fp16,
        "gradient_checkpointing": runtime.gradient_checkpointing,
        "torch_threads": threads,
        "processes": processes,
    }


def _step_of(path: Path | None) -> int | None:
    if path is None:
        return None
    suffix = path.name.removeprefix("checkpoint-")
    return int(suffix) if suffix.isdigit() else None


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)
