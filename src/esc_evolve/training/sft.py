"""Phase 1, experience acquisition: LoRA SFT of the backbone on ESC turns (+ replay) with trl, giving M0.

`train_sft(settings, model, data, output_dir, ...)` needs no run directory: it writes
- `output_dir/`: the LoRA adapter, tokenizer and `train_summary.json`, published by renaming a finished folder;
- `work_dir/checkpoint-N/`: trainer checkpoints every `save_steps` (the last two are kept), and `base_eval.json`,
  the untrained backbone's eval loss (computed once, reused on resume);
- `log_dir/`: TensorBoard logs (loss, learning rate, grad norm, tokens/s, eval loss before and after);
- `merged_dir/` with `settings.merge_adapter`: the backbone with the adapter merged in (loadable without peft).

Training resumes from the newest complete checkpoint in `work_dir` whenever one exists. The same function runs
data-parallel under `accelerate launch` (see docs/sft.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from esc_evolve.config import DataSettings, ModelSettings, SFTSettings
from esc_evolve.models.lineage import write_lineage
from esc_evolve.storage import publish_folder, read_json, staging_folder, write_json_atomic
from esc_evolve.training.data import SFTRows, build_sft_rows, trl_dataset
from esc_evolve.training.settings import (
    Runtime,
    lora_config,
    model_init_kwargs,
    process_state,
    resolve_runtime,
    tensorboard_callback,
    trl_sft_config,
)

log = logging.getLogger(__name__)

SUMMARY_FILE = "train_summary.json"
BASE_EVAL_FILE = "base_eval.json"


def train_sft(
    settings: SFTSettings,
    model: ModelSettings,
    data: DataSettings,
    output_dir: Path,
    *,
    seed: int,
    work_dir: Path | None = None,
    log_dir: Path | None = None,
    merged_dir: Path | None = None,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Train (or resume training) M0 into `output_dir` and return the training summary.

    `work_dir` (default `output_dir` + `-checkpoints`) holds checkpoints, `merged_dir` (default `output_dir` +
    `-merged`) the merged model; extra trainer `callbacks` are for tests and tools."""
    from esc_evolve.training.speed import ThroughputCallback, set_torch_threads

    work_dir = work_dir or output_dir.with_name(f"{output_dir.name}-checkpoints")
    started = time.perf_counter()
    state = process_state(model)
    threads = set_torch_threads(settings.num_threads)
    runtime = resolve_runtime(model, settings)
    rows = build_sft_rows(settings, data, model, seed)
    throughput = ThroughputCallback()
    trainer = build_trainer(settings, model, rows, runtime, seed, work_dir, [throughput, *(callbacks or [])], log_dir)
    outcome = train_and_evaluate(trainer, runtime, work_dir, state, has_eval=bool(rows.eval))
    summary = {
        "steps": trainer.state.global_step,
        **outcome,
        **throughput.summary(samples_per_step(settings, state.num_processes)),
        "train_loss_last_logged": _last_logged_loss(trainer),
        **rows.counts,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "runtime": _runtime_info(runtime, threads, state.num_processes),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    save_adapter(trainer, output_dir, summary, state, model.name)
    if settings.merge_adapter and state.is_main_process:
        merge_adapter(model, output_dir, merged_dir or output_dir.with_name(f"{output_dir.name}-merged"))
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
    settings: SFTSettings,
    model: ModelSettings,
    rows: SFTRows,
    runtime: Runtime,
    seed: int,
    work_dir: Path,
    callbacks: list[Any],
    log_dir: Path | None = None,
) -> Any:
    from transformers import AutoConfig
    from trl import SFTTrainer

    from esc_evolve.models import load_tokenizer, resolve_backbone

    source = resolve_backbone(model.name, model.cache_dir)
    args = trl_sft_config(settings, seed, work_dir, runtime)
    args.model_init_kwargs = model_init_kwargs(model, runtime)
    model_type = AutoConfig.from_pretrained(
        source, revision=model.revision, trust_remote_code=model.trust_remote_code
    ).model_type
    tensorboard = tensorboard_callback(log_dir)
    return SFTTrainer(
        model=source,  # loaded by trl, so that DeepSpeed ZeRO-3 can shard it while it loads
        args=args,
        train_dataset=trl_dataset(rows.train),
        eval_dataset=trl_dataset(rows.eval) if rows.eval else None,
        processing_class=load_tokenizer(model),
        peft_config=lora_config(settings.lora, model_type),
        # Ours first: it adds tokens/s to the logs before TensorBoard writes them.
        callbacks=[*callbacks, *([tensorboard] if tensorboard else [])],
    )


def base_eval_loss(trainer: Any, checkpoints: Path, state: Any) -> float:
    """Eval loss before any training step: the LoRA B matrices start at zero, so this is the backbone's own."""
    saved = read_json(checkpoints / BASE_EVAL_FILE)
    if saved is not None:
        return saved["eval_loss"]
    file = checkpoints / BASE_EVAL_FILE
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
        if step is not None and read_json(path / "trainer_state.json") is not None:
            complete.append((step, path))
    return max(complete)[1] if complete else None


def save_adapter(trainer: Any, target: Path, summary: dict[str, Any], state: Any, base: str) -> None:
    """Save into a staging folder (all processes: sharded models gather there), then rename it into place."""
    if state.is_main_process:
        staging_folder(target)  # clears what an interrupted save left
    state.wait_for_everyone()
    staging = staging_folder(target, clear=False)
    trainer.save_model(str(staging))
    if state.is_main_process:
        write_json_atomic(staging / SUMMARY_FILE, summary)
        write_lineage(staging, base, None)  # M0's parent is the backbone itself
        publish_folder(staging, target)
    state.wait_for_everyone()


def merge_adapter(model: ModelSettings, adapter: Path, target: Path) -> None:
    """Reload the backbone with the saved adapter and merge: independent of how training was sharded."""
    from esc_evolve.models import load_model

    loaded, tokenizer = load_model(model, adapter=adapter, merge=True)
    staging = staging_folder(target)
    loaded.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    publish_folder(staging, target)
    log.info("merged model saved to %s", target)


def samples_per_step(settings: SFTSettings, processes: int) -> int:
    return settings.per_device_batch_size * settings.gradient_accumulation_steps * processes


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


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)
