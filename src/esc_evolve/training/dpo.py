"""Phase 2, the training half of an iteration: DPO of M_t on its own (y', y) pairs, giving M_{t+1}.

The reference model must be M_t, not the raw backbone. M_t's adapter chain is merged into the weights and a
fresh LoRA adapter is trained on top; trl computes the reference log-probs with the adapter disabled, which is
exactly the merged M_t. M_{t+1} is saved as that adapter with a lineage pointer to M_t (see models/lineage.py).

`train_dpo(settings, model, parent, preference_file, output_dir, ...)` needs no run directory: it writes the
adapter and `train_summary.json` to `output_dir` (published by renaming a finished folder), resumable
checkpoints to `work_dir` and TensorBoard logs to `log_dir`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from esc_evolve.config import DPOSettings, ModelSettings
from esc_evolve.errors import EscEvolveError
from esc_evolve.models.lineage import write_lineage
from esc_evolve.storage import publish_folder, staging_folder, write_json_atomic
from esc_evolve.training.data import trl_dataset
from esc_evolve.training.settings import (
    Runtime,
    lora_config,
    process_state,
    resolve_runtime,
    tensorboard_callback,
    trainer_args,
)
from esc_evolve.training.sft import SUMMARY_FILE, latest_checkpoint

log = logging.getLogger(__name__)

LOGGED = (
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "loss",
)


class NoPairsError(EscEvolveError):
    """An iteration kept no preference pair, so there is nothing to train on."""


def trl_loss(dpo: DPOSettings) -> tuple[list[str], list[float] | None]:
    """Our loss options -> trl's `loss_type` list and `loss_weights` (RPO = DPO loss + alpha * NLL on chosen)."""
    if dpo.rpo_alpha is None:
        return [dpo.loss_type], None
    return [dpo.loss_type, "sft"], [1.0, dpo.rpo_alpha]


def trl_dpo_config(settings: DPOSettings, seed: int, output_dir: Path, runtime: Runtime) -> Any:
    from trl import DPOConfig as TrlDPOConfig

    loss_type, loss_weights = trl_loss(settings)
    return TrlDPOConfig(
        **trainer_args(settings, seed, output_dir, runtime),
        beta=settings.beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        ld_alpha=settings.ld_alpha,
    )


def train_dpo(
    settings: DPOSettings,
    model: ModelSettings,
    parent: Path,
    preference_file: Path,
    output_dir: Path,
    *,
    seed: int,
    work_dir: Path | None = None,
    log_dir: Path | None = None,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Train the adapter of M_{t+1} on top of M_t (`parent`, an adapter folder) on the pairs of `preference_file`.

    `work_dir` (default `output_dir` + `-checkpoints`) holds resumable checkpoints. Raises `NoPairsError` when the
    file holds no pair."""
    from esc_evolve.training.speed import set_torch_threads

    work_dir = work_dir or output_dir.with_name(f"{output_dir.name}-checkpoints")
    rows = _read_preference(preference_file)
    started = time.perf_counter()
    state = process_state(model)
    set_torch_threads(settings.num_threads)
    runtime = resolve_runtime(model, settings)
    trainer = build_dpo_trainer(settings, model, rows, runtime, parent, seed, work_dir, callbacks or [], log_dir)
    resume_from = latest_checkpoint(work_dir)
    if resume_from:
        log.info("resuming DPO from %s", resume_from)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    summary = {
        "pairs": len(rows),
        "steps": trainer.state.global_step,
        "resumed_from_step": int(resume_from.name.split("-")[-1]) if resume_from else None,
        **logged_metrics(trainer.state.log_history),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    staging = staging_folder(output_dir, clear=False)
    trainer.save_model(str(staging))
    if state.is_main_process:
        write_json_atomic(staging / SUMMARY_FILE, summary)
        write_lineage(staging, model.name, parent)  # relative path: staging sits beside the target
        publish_folder(staging, output_dir)
    state.wait_for_everyone()
    return summary


def build_dpo_trainer(
    settings: DPOSettings,
    model: ModelSettings,
    rows: list[dict[str, Any]],
    runtime: Runtime,
    parent: Path,
    seed: int,
    work_dir: Path,
    callbacks: list[Any],
    log_dir: Path | None = None,
) -> Any:
    from trl import DPOTrainer

    from esc_evolve.models import load_model

    # M_t with every adapter merged: the starting point of the new adapter and, with it disabled, the reference.
    loaded, tokenizer = load_model(model.model_copy(update={"dtype": _dtype_name(runtime)}), parent, merge=True)
    loaded.train()
    tensorboard = tensorboard_callback(log_dir)
    return DPOTrainer(
        model=loaded,
        ref_model=None,
        args=trl_dpo_config(settings, seed, work_dir, runtime),
        train_dataset=trl_dataset(rows),
        processing_class=tokenizer,
        peft_config=lora_config(settings.lora, loaded.config.model_type),
        callbacks=[*callbacks, *([tensorboard] if tensorboard else [])],
    )


def logged_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    """First and last logged value of each DPO metric (reward accuracy, margins, log-probs, loss)."""
    out: dict[str, Any] = {}
    for key in LOGGED:
        values = [entry[key] for entry in history if key in entry]
        if values:
            name = key.replace("/", "_")
            out[f"{name}_first"] = round(float(values[0]), 4)
            out[f"{name}_last"] = round(float(values[-1]), 4)
            out[f"{name}_mean"] = round(sum(values) / len(values), 4)
    return out


def _read_preference(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        with path.open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    if not rows:
        raise NoPairsError(
            f"{path}: no preference pair was kept in this iteration; see pairs.jsonl for the drop reasons "
            "(loosen evolve.filters or raise evolve.contexts_per_iteration)"
        )
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


def _dtype_name(runtime: Runtime) -> str:
    return str(runtime.dtype).removeprefix("torch.")
