"""Phase 2, the training half of an iteration: DPO of M_t on its own (y', y) pairs, giving M_{t+1}.

The reference model must be M_t, not the raw backbone. M_t's adapter chain is merged into the weights and a
fresh LoRA adapter is trained on top; trl computes the reference log-probs with the adapter disabled, which is
exactly the merged M_t. M_{t+1} is saved as that adapter with a lineage pointer to M_t (see models/lineage.py).

Speed (benchmarks/dpo_step.py measures each): the reference log-probs are computed once, before training
(`dpo.precompute_ref_log_probs`), pairs are batched by length (`dpo.group_by_length`), and training runs under
SFT's fast paths (bf16 autocast where the device has it, eager attention on CPU, LM head only on the reply
tokens, LoRA inputs left in the autocast dtype).

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
from esc_evolve.training.sft import (
    NoCheckpointAtTheEnd,
    latest_checkpoint,
    runtime_info,
    samples_per_step,
    save_adapter,
)

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
        # The reference never changes during an iteration: one forward per pair, before training, instead of one per
        # pair and epoch inside the steps. Recomputed (the same numbers) whenever the trainer is built, so a resumed
        # run needs nothing from the checkpoint.
        precompute_ref_log_probs=settings.precompute_ref_log_probs,
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
        include_num_input_tokens_seen="non_padding",  # chosen + rejected rows, for tokens/s
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

    from esc_evolve.training.speed import ThroughputCallback, compact_lm_head_on_cpu, fast_paths, set_torch_threads

    work_dir = work_dir or output_dir.with_name(f"{output_dir.name}-checkpoints")
    rows = _read_preference(preference_file)
    started = time.perf_counter()
    set_seed(seed)  # trl draws the LoRA weights before the trainer seeds itself: same seed, same M_t+1
    state = process_state(model)
    threads = set_torch_threads(settings.num_threads)
    runtime = resolve_runtime(model, settings)
    throughput = ThroughputCallback()
    extra = [throughput, NoCheckpointAtTheEnd(), *(callbacks or [])]
    # trl runs the precomputed reference pass while the trainer is built: the compact LM head must be on by then.
    with compact_lm_head_on_cpu():
        trainer = build_dpo_trainer(settings, model, rows, runtime, parent, seed, work_dir, extra, log_dir, reference)
        setup_seconds = round(time.perf_counter() - started, 2)
        resume_from = latest_checkpoint(work_dir)
        if resume_from:
            log.info("resuming DPO from %s", resume_from)
        with fast_paths(trainer, runtime):
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    summary = {
        "pairs": len(rows),
        **({"reference": str(reference)} if reference is not None else {}),
        "steps": trainer.state.global_step,
        "resumed_from_step": int(resume_from.name.split("-")[-1]) if resume_from else None,
        **logged_metrics(trainer.state.log_history),
        **throughput.summary(samples_per_step(settings, state.num_processes)),
        "setup_seconds": setup_seconds,  # loading, tokenising and, by default, the reference pass
        "runtime": runtime_info(runtime, threads, state.num_processes),
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
    from esc_evolve.models import load_model

    # M_t with every adapter merged: the starting point of the new adapter and, with it disabled, the reference.
    # Loaded in the dtype and with the attention SFT trains with (bf16 weights under bf16 autocast, eager on CPU).
    typed = model.model_copy(update={"dtype": _dtype_name(runtime), "attn_implementation": runtime.attn_implementation})
    loaded, tokenizer = load_model(typed, parent, merge=True)
    loaded.train()
    # Another reference (M0): a second, frozen model that trl scores the pairs with instead of disabling the adapter.
    ref_model = None
    if reference is not None and reference.resolve() != parent.resolve():
        ref_model = load_model(typed, reference, merge=True)[0]
    tensorboard = tensorboard_callback(log_dir)
    return dpo_trainer_class()(
        model=loaded,
        ref_model=ref_model,
        args=trl_dpo_config(settings, seed, work_dir, runtime),
        train_dataset=trl_dataset(rows),
        processing_class=tokenizer,
        peft_config=lora_config(settings.lora, loaded.config.model_type),
        callbacks=[*callbacks, *([tensorboard] if tensorboard else [])],
    )


def dpo_trainer_class() -> type:
    """trl's `DPOTrainer` with two fixes for our defaults (trl has no option for either).

    - `group_by_length`: transformers' `LengthGroupedSampler` measures an `input_ids` column, which trl's tokenised
      pairs do not have (they hold `prompt_ids`, `chosen_ids`, `rejected_ids`), so the plain trainer fails with
      that strategy. It is told each pair's length: that of its longer side, one padded row each.
    - `precompute_ref_log_probs`: trl's reference pass batches the pairs in dataset order, so a batch pads to its
      longest pair (~20% padding on ESC pairs); it scores them sorted by length instead, then restores the order.
      And it iterates a DataLoader, which draws a seed from torch's generator after the trainer seeded itself:
      that would change the order pairs are trained in, so it runs on a forked generator. Same steps, same order.
    """
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import DPOTrainer

    class EscDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            dataset = self.train_dataset if train_dataset is None else train_dataset
            if self.args.train_sampling_strategy != "group_by_length" or dataset is None:
                return super()._get_train_sampler(train_dataset)
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps  # as transformers groups
            return LengthGroupedSampler(batch, lengths=pair_lengths(dataset, self.args.max_length))

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            lengths = pair_lengths(dataset, self.args.max_length)
            order = sorted(range(len(lengths)), key=lengths.__getitem__)
            with torch.random.fork_rng(devices=[]):
                scored = super()._precompute_ref_logps(dataset.select(order), name, batch_size)
            back = [0] * len(order)
            for position, index in enumerate(order):
                back[index] = position
            return scored.select(back)

    return EscDPOTrainer


def pair_lengths(dataset: Any, max_length: int | None) -> list[int]:
    """Tokens in the longer row (prompt + chosen or prompt + rejected) of each tokenised pair, as truncated."""
    columns = zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
    lengths = [len(prompt) + max(len(chosen), len(rejected)) for prompt, chosen, rejected in columns]
    return [min(length, max_length) for length in lengths] if max_length else lengths


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
