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
from esc_evolve.errors import DataFormatError, EscEvolveError
from esc_evolve.training.data import trl_dataset
from esc_evolve.training.settings import (
    Runtime,
    lora_config,
    process_state,
    resolve_runtime,
    tensorboard_callback,
    trainer_args,
)
from esc_evolve.training.sft import NoCheckpointAtTheEnd, latest_checkpoint, save_adapter

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
    reference: Path | None = None,
) -> dict[str, Any]:
    """Train the adapter of M_{t+1} on top of M_t (`parent`, an adapter folder) on the pairs of `preference_file`.

    `work_dir` (default `output_dir` + `-checkpoints`) holds resumable checkpoints. `reference` is another model
    (an adapter folder, e.g. M0) to use as the DPO reference instead of M_t (`dpo.reference: m0`). Raises
    `NoPairsError` when the file holds no pair."""
    from transformers import set_seed

    from esc_evolve.training.speed import set_torch_threads

    work_dir = work_dir or output_dir.with_name(f"{output_dir.name}-checkpoints")
    rows = _read_preference(preference_file)
    started = time.perf_counter()
    set_seed(seed)  # trl draws the LoRA weights before the trainer seeds itself: same seed, same M_t+1
    state = process_state(model)
    set_torch_threads(settings.num_threads)
    runtime = resolve_runtime(model, settings)
    extra = [NoCheckpointAtTheEnd(), *(callbacks or [])]
    trainer = build_dpo_trainer(settings, model, rows, runtime, parent, seed, work_dir, extra, log_dir, reference)
    resume_from = latest_checkpoint(work_dir)
    if resume_from:
        log.info("resuming DPO from %s", resume_from)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    summary = {
        "pairs": len(rows),
        **({"reference": str(reference)} if reference is not None else {}),
        "steps": trainer.state.global_step,
        "resumed_from_step": int(resume_from.name.split("-")[-1]) if resume_from else None,
        **logged_metrics(trainer.state.log_history),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    save_adapter(trainer, output_dir, summary, state, model.name, parent)
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
    reference: Path | None = None,
) -> Any:
    from trl import DPOTrainer

    from esc_evolve.models import load_model

    # M_t with every adapter merged: the starting point of the new adapter and, with it disabled, the reference.
    typed = model.model_copy(update={"dtype": _dtype_name(runtime)})
    loaded, tokenizer = load_model(typed, parent, merge=True)
    loaded.train()
    # Another reference (M0): a second, frozen model that trl scores the pairs with instead of disabling the adapter.
    ref_model = None
    if reference is not None and reference.resolve() != parent.resolve():
        ref_model = load_model(typed, reference, merge=True)[0]
    tensorboard = tensorboard_callback(log_dir)
    return DPOTrainer(
        model=loaded,
        ref_model=ref_model,
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
            rows = [_preference_row(path, number, line) for number, line in enumerate(handle, 1) if line.strip()]
    if not rows:
        raise NoPairsError(
            f"{path}: no preference pair was kept in this iteration; see pairs.jsonl for the drop reasons "
            "(loosen evolve.filters or raise evolve.contexts_per_iteration)"
        )
    return rows


def _preference_row(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    except (ValueError, TypeError, KeyError) as exc:
        problem = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise DataFormatError(
            f"{path}:{number}: not a preference pair ({problem}); it is written from pairs.jsonl: delete it and rerun"
        ) from None


def _dtype_name(runtime: Runtime) -> str:
    return str(runtime.dtype).removeprefix("torch.")
