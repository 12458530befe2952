"""`esc-evolve sft CONFIG`: phase 1 alone (LoRA SFT -> RUN/m0), resumable, data-parallel under accelerate."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from esc_evolve.cli.common import SetOption, console, user_errors

if TYPE_CHECKING:
    from esc_evolve.config import ExperimentConfig


def register(app: typer.Typer) -> None:
    app.command("sft")(sft)


@user_errors
def sft(
    config: Path = typer.Argument(..., help="YAML config, e.g. configs/esconv-cpu.yaml."),
    overrides: list[str] | None = SetOption,
    resume: bool = typer.Option(
        False, "--resume", help="Reopen the run directory and continue from its newest SFT checkpoint."
    ),
) -> None:
    """LoRA SFT of the backbone on ESC turns (experience acquisition): writes RUN/m0 and its train summary.

    Data-parallel: `accelerate launch --config_file configs/accelerate/<file>.yaml $(which esc-evolve) sft ...`.
    """
    from contextlib import nullcontext

    from esc_evolve.config import load_config
    from esc_evolve.pipeline import RunLayout, RunLock
    from esc_evolve.training.settings import process_state

    cfg = load_config(config, overrides)
    state = process_state(cfg.model)
    # One writer per run directory: the main process holds the lock for the processes it launched with.
    lock = RunLock(RunLayout.of(cfg.run).lock_file) if state.is_main_process else nullcontext()
    with lock:
        _sft(cfg, state, resume)


def _sft(cfg: ExperimentConfig, state: Any, resume: bool) -> None:
    from transformers import set_seed

    from esc_evolve.logging_setup import setup_logging
    from esc_evolve.pipeline import RunDir
    from esc_evolve.pipeline.stages import sft as sft_stage

    # The main process creates (or checks) the run directory; the others reopen the one it made.
    with state.main_process_first():
        run = RunDir.create(cfg, resume=resume or not state.is_main_process)
    setup_logging(cfg.run.log_level if state.is_main_process else "WARNING", run.log_file)
    set_seed(cfg.run.seed)
    m0 = run.layout.model_dir(0)
    if run.stage_done("sft"):
        console.print(f"[green]already done[/green]: {m0} (stage 'sft' in stages.json)")
        return
    summary = sft_stage(run)
    if state.is_main_process:
        run.mark_done("sft", summary)
        console.print(
            f"[green]done[/green]: {m0}  eval loss {summary['eval_loss']} "
            f"(untrained backbone {summary['base_eval_loss']}), {summary['tokens_per_second']} tokens/s"
        )
