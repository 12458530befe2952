"""Phase 2, the training half of an iteration: DPO of M_t on its own (y', y) pairs, giving M_{t+1}.

The reference model must be M_t, not the raw backbone. M_t's adapter chain is merged into the weights and a
fresh LoRA adapter is trained on top; trl computes the reference log-probs with the adapter disabled, which is
exactly the merged M_t. M_{t+1} is saved as that adapter with a lineage pointer to M_t (see models/lineage.py).

Run directory: `iterN/dpo-checkpoints/` (resumable), `iterN/mN/` (adapter + `train_summary.json`, published
by renaming a finished folder), `logs/tensorboard/dpoN/`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from esc_evolve.config import DPOConfig, ExperimentConfig
from esc_evolve.errors import EscEvolveError
from esc_evolve.models.lineage import write_lineage
from esc_evolve.rundir import RunDir, write_json_atomic
from esc_evolve.training.settings import Runtime, lora_config, process_state, resolve_runtime, trainer_args
from esc_evolve.training.sft import SUMMARY_FILE, latest_checkpoint, publish, tensorboard_callback

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


def trl_loss(dpo: DPOConfig) -> tuple[list[str], list[float] | None]:
    """Our loss options -> trl's `loss_type` list and `loss_weights` (RPO = DPO loss + alpha * NLL on chosen)."""
    if dpo.rpo_alpha is None:
        return [dpo.loss_type], None
    return [dpo.loss_type, "sft"], [1.0, dpo.rpo_alpha]


def trl_dpo_config(config: ExperimentConfig, output_dir: Path, runtime: Runtime) -> Any:
    from trl import DPOConfig as TrlDPOConfig

    dpo = config.dpo
    loss_type, loss_weights = trl_loss(dpo)
    return TrlDPOConfig(
        **trainer_args(config, dpo, output_dir, runtime),
        beta=dpo.beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        ld_alpha=dpo.ld_alpha,
        max_length=dpo.max_length,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
    )


def run_dpo(run: RunDir, iteration: int, parent: Path, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train M_{iteration} from M_{iteration-1} (`parent`, an adapter folder) on `iterN/preference.jsonl`."""
    config = run.config
    folder = run.path / f"iter{iteration}"
    rows = _read_preference(folder / "preference.jsonl")
    started = time.perf_counter()
    state = process_state(config)
    runtime = resolve_runtime(config, config.dpo)
    trainer = build_dpo_trainer(config, rows, runtime, parent, folder, run.path, iteration, callbacks or [])
    checkpoints = folder / "dpo-checkpoints"
    resume_from = latest_checkpoint(checkpoints)
    if resume_from:
        log.info("resuming DPO from %s", resume_from)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    summary = {
        "iteration": iteration,
        "pairs": len(rows),
        "steps": trainer.state.global_step,
        "resumed_from_step": int(resume_from.name.split("-")[-1]) if resume_from else None,
        **logged_metrics(trainer.state.log_history),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    target = folder / f"m{iteration}"
    staging = target.with_name(f".{target.name}.staging")
    trainer.save_model(str(staging))
    if state.is_main_process:
        write_json_atomic(staging / SUMMARY_FILE, summary)
        write_lineage(staging, config.model.name, parent)  # relative path: staging sits beside the target
        publish(staging, target)
    state.wait_for_everyone()
    return summary


def build_dpo_trainer(
    config: ExperimentConfig,
    rows: list[dict[str, Any]],
    runtime: Runtime,
    parent: Path,
    folder: Path,
    run_path: Path,
    iteration: int,
    callbacks: list[Any],
) -> Any:
    from datasets import Dataset
    from trl import DPOTrainer

    from esc_evolve.models import load_model

    # M_t with every adapter merged: the starting point of the new adapter and, with it disabled, the reference.
    model, tokenizer = load_model(config.model.model_copy(update={"dtype": _dtype_name(runtime)}), parent, merge=True)
    model.train()
    tensorboard = tensorboard_callback(run_path, f"dpo{iteration}")
    return DPOTrainer(
        model=model,
        ref_model=None,
        args=trl_dpo_config(config, folder / "dpo-checkpoints", runtime),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(config.dpo.lora, model.config.model_type),
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
