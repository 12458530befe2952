"""`esc-evolve dpo RUN -i N`: one iteration's DPO (M_{N-1} + its pairs -> M_N), alone or under accelerate."""

from __future__ import annotations

from pathlib import Path

import typer

from esc_evolve.cli.common import console, user_errors


def register(app: typer.Typer) -> None:
    app.command("dpo")(dpo)


@user_errors
def dpo(
    run_dir: Path = typer.Argument(..., help="A run directory whose iterN/preference.jsonl exists."),
    iteration: int = typer.Option(..., "--iteration", "-i", min=1, help="The iteration N: trains M_N."),
) -> None:
    """DPO of M_{N-1} on iteration N's pairs -> RUN/iterN/mN (and its served artifact, mN/served/), resumable.

    Data-parallel: `accelerate launch --config_file configs/accelerate/<file>.yaml $(which esc-evolve) dpo RUN -i N`
    (the main process holds the run's lock and records the stage).
    """
    from contextlib import nullcontext

    from esc_evolve.cli.pairs_cmd import open_run
    from esc_evolve.pipeline import RunLock
    from esc_evolve.pipeline.stages import dpo as dpo_stage
    from esc_evolve.pipeline.stages import run_stage
    from esc_evolve.training.settings import process_state

    run = open_run(run_dir, None, allowed=())
    stage = f"iter{iteration}.dpo"
    if run.stage_done(stage):
        console.print(f"[green]already done[/green]: {stage} (in stages.json)")
        return
    state = process_state(run.config.model)
    with RunLock(run.layout.lock_file) if state.is_main_process else nullcontext():
        if state.is_main_process:
            run_stage(run, stage, lambda r: dpo_stage(r, iteration))
            console.print(f"[green]done[/green]: {run.layout.model_dir(iteration)} ({run.stage_summary(stage)})")
        else:
            dpo_stage(run, iteration)
