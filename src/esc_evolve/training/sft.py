"""Phase 1, experience acquisition: LoRA SFT of the backbone on ESC turns (+ replay) with trl, giving M0.

`train_sft(settings, model, data, output_dir, ...)` needs no run directory: it writes
- `output_dir/`: the LoRA adapter, tokenizer and `train_summary.json`, published by renaming a finished folder;
- `work_dir/checkpoint-N/`: trainer checkpoints every `save_steps`, none at the last step (`NoCheckpointAtTheEnd`;
  the last two are kept), and `base_eval.json`, the untrained backbone's eval loss (computed once, reused on
  resume);
- `log_dir/`: TensorBoard logs (loss, learning rate, grad norm, tokens/s, eval loss before and after);
- `merged_dir/` with `settings.merge_adapter`: the backbone with the adapter merged in (loadable without peft).

Training resumes from the newest complete checkpoint in `work_dir` whenever one exists. The same function runs
data-parallel under `accelerate launch` (see docs/sft.md).
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from esc_evolve.config import DataSettings, ModelSettings, SFTSettings, TrainerSettings
from esc_evolve.models.lineage import write_lineage
from esc_evolve.storage import publish_folder, read_json, staging_folder, write_json_atomic
from esc_evolve.training.data import Row, SFTRows, build_sft_rows, fit_to_length, trl_dataset
from esc_evolve.training.settings import (
    Runtime,
    deepspeed_stage,
    eval_before_training_problem,
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
    from transformers import set_seed

    from esc_evolve.training.speed import ThroughputCallback, set_torch_threads

    work_dir = work_dir or output_dir.with_name(f"{output_dir.name}-checkpoints")
    started = time.perf_counter()
    set_seed(seed)  # trl draws the LoRA weights before the trainer seeds itself: same seed, same M0
    state = process_state(model)
    threads = set_torch_threads(settings.num_threads)
    runtime = resolve_runtime(model, settings)
    rows = build_sft_rows(settings, data, model, seed)
    throughput = ThroughputCallback()
    extra = [throughput, NoCheckpointAtTheEnd(), *(callbacks or [])]
    trainer = build_trainer(settings, model, rows, runtime, seed, work_dir, extra, log_dir)
    outcome = train_and_evaluate(trainer, runtime, work_dir, state, has_eval=bool(rows.eval))
    summary = {
        "steps": trainer.state.global_step,
        **outcome,
        **throughput.summary(samples_per_step(settings, state.num_processes)),
        "train_loss_last_logged": _last_logged_loss(trainer),
        **rows.counts,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "runtime": runtime_info(runtime, threads, state.num_processes),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    save_adapter(trainer, output_dir, summary, state, model.name)
    if settings.merge_adapter and state.is_main_process:
        merge_adapter(model, output_dir, merged_dir or output_dir.with_name(f"{output_dir.name}-merged"))
    state.wait_for_everyone()
    log.info("SFT done: eval loss %s (untrained backbone %s)", summary["eval_loss"], summary["base_eval_loss"])
    return summary


def train_sft_on(
    settings: SFTSettings,
    model: ModelSettings,
    parent: Path,
    rows: list[Row],
    output_dir: Path,
    *,
    seed: int,
    work_dir: Path | None = None,
    log_dir: Path | None = None,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """SFT of a fresh LoRA adapter on top of `parent` (M_t, its adapter chain merged, as DPO trains) on
    prompt/completion `rows`, saved with a lineage pointing at `parent`: M_t+1 of the SFT baseline
    (`evolve.update: sft`). Resumes from the newest checkpoint in `work_dir`."""
    from transformers import set_seed
    from trl import SFTTrainer

    from esc_evolve.models import load_model
    from esc_evolve.training.speed import set_torch_threads

    work_dir = work_dir or output_dir.with_name(f"{output_dir.name}-checkpoints")
    started = time.perf_counter()
    set_seed(seed)
    state = process_state(model)
    set_torch_threads(settings.num_threads)
    runtime = resolve_runtime(model, settings)
    dtype = str(runtime.dtype).removeprefix("torch.")
    loaded, tokenizer = load_model(model.model_copy(update={"dtype": dtype}), parent, merge=True)
    loaded.train()
    shortened = sum(fit_to_length(row, tokenizer, settings.max_length) for row in rows)
    tensorboard = tensorboard_callback(log_dir)
    trainer = SFTTrainer(
        model=loaded,
        args=trl_sft_config(settings, seed, work_dir, runtime),
        train_dataset=trl_dataset(rows),
        processing_class=tokenizer,
        peft_config=lora_config(settings.lora, loaded.config.model_type),
        callbacks=[NoCheckpointAtTheEnd(), *(callbacks or []), *([tensorboard] if tensorboard else [])],
    )
    resume_from = latest_checkpoint(work_dir)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    summary = {
        "samples": len(rows),
        "shortened_contexts": shortened,
        "steps": trainer.state.global_step,
        "resumed_from_step": _step_of(resume_from),
        "train_loss_first_logged": _first_logged_loss(trainer),
        "train_loss_last_logged": _last_logged_loss(trainer),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    save_adapter(trainer, output_dir, summary, state, model.name, parent)
    return summary


def train_and_evaluate(trainer: Any, runtime: Runtime, checkpoints: Path, state: Any, has_eval: bool) -> dict[str, Any]:
    """Eval the untrained model, train from the newest checkpoint if there is one, eval again."""
    from esc_evolve.training.speed import fast_paths

    problem = eval_before_training_problem(deepspeed_stage(trainer)) if has_eval else None
    if problem:
        log.info("no eval loss of the untrained backbone: %s", problem)
    with fast_paths(trainer, runtime):
        base_loss = base_eval_loss(trainer, checkpoints, state) if has_eval and problem is None else None
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
    import torch

    file = checkpoints / BASE_EVAL_FILE
    # Evaluating draws a seed from torch's generator (each data loader does); a resumed run skips this eval, so
    # it must leave the generator as it found it, or training after a resume takes other random numbers.
    with torch.random.fork_rng(devices=[]):
        loss = trainer.evaluate()["eval_loss"]
    if state.is_main_process:
        write_json_atomic(file, {"eval_loss": loss})
    return loss


class NoCheckpointAtTheEnd(TrainerCallback):
    """No checkpoint at the last step. transformers, resumed from a checkpoint whose step is already the last one,
    trains one step more (mid-epoch it takes the next batch before it looks at the step count), so a run killed
    between its last step and the publish would end one step further. Without that checkpoint it redoes the
    steps since the one before, with the same numbers."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step >= state.max_steps:
            control.should_save = False  # set by transformers' own callback, which runs before this one
        return control


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest `checkpoint-N` whose files are all complete; incomplete newer ones are logged and skipped.

    transformers' `get_last_checkpoint` takes the highest number even if the save was interrupted, and a
    trainer_state.json (written last) is not proof either: a crash before the page cache reached the disk, or a
    full disk, can leave it next to a cut weights or optimizer file.
    """
    numbered = sorted(((_step_of(p), p) for p in folder.glob("checkpoint-*") if _step_of(p) is not None), reverse=True)
    for _, path in numbered:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is incomplete (%s): skipped", path, problem)
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None: every file the trainer writes is checked cheaply
    (JSON parses, a safetensors file is as long as its header says, a torch file's zip directory is there)."""
    if read_json(path / "trainer_state.json") is None:
        return "no readable trainer_state.json"
    for file in sorted(path.rglob("*")):
        if file.suffix == ".json" and read_json(file) is None:
            return f"{file.name} is not valid JSON"
        if file.suffix == ".safetensors" and not _safetensors_complete(file):
            return f"{file.name} is cut short"
        if file.suffix in {".pt", ".pth", ".bin"} and not _zip_complete(file):
            return f"{file.name} is cut short"
    return None


def _safetensors_complete(file: Path) -> bool:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors up to the last offset."""
    try:
        with file.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return file.stat().st_size == 8 + length + end
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def _zip_complete(file: Path) -> bool:
    """torch.save writes a zip archive, whose directory is at its end: a cut file has none."""
    try:
        with zipfile.ZipFile(file):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def save_adapter(
    trainer: Any, target: Path, summary: dict[str, Any], state: Any, base: str, parent: Path | None = None
) -> None:
    """Save into a staging folder (all processes: sharded models gather there), then rename it into place. A
    staging folder left by an interrupted save is removed first, so nothing stale is published with it.
    `parent` is the adapter this one was trained on top of (None: the backbone itself, as for M0)."""
    if state.is_main_process:
        staging_folder(target)  # clears what an interrupted save left
    state.wait_for_everyone()
    staging = staging_folder(target, clear=False)
    trainer.save_model(str(staging))
    if state.is_main_process:
        write_json_atomic(staging / SUMMARY_FILE, summary)
        write_lineage(staging, base, parent)  # a relative path: staging sits beside the target
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


def samples_per_step(settings: TrainerSettings, processes: int) -> int:
    if settings.global_batch_size is not None:  # accumulation adapts to the process count (settings.py)
        return settings.global_batch_size
    return settings.per_device_batch_size * settings.gradient_accumulation_steps * processes


def _first_logged_loss(trainer: Any) -> float | None:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return _round(losses[0]) if losses else None


def _last_logged_loss(trainer: Any) -> float | None:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return _round(losses[-1]) if losses else None


def runtime_info(runtime: Runtime, threads: int, processes: int) -> dict[str, Any]:
    """What the summary records of how a trainer ran: device, precision, threads, processes."""
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
