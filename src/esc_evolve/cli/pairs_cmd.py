"""`esc-evolve pairs RUN -i N [--shard k/N]`: one iteration's pair generation, alone or as one of N workers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from esc_evolve.cli.common import SetOption, console, user_errors

if TYPE_CHECKING:
    from esc_evolve.pipeline import RunDir


def register(app: typer.Typer) -> None:
    app.command("pairs")(pairs)


@user_errors
def pairs(
    run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/paper-llama3-8b (its M_{N-1} must exist)."),
    iteration: int = typer.Option(..., "--iteration", "-i", min=1, help="The iteration N: M_{N-1} makes its pairs."),
    shard: str | None = typer.Option(
        None, "--shard", help="k/N: only shard k of N (contexts split by sample id) into its own file."
    ),
    overrides: list[str] | None = SetOption,
) -> None:
    """Pairs of iteration N (answer, reflect, refine, filter) -> RUN/iterN/pairs.jsonl and preference.jsonl.

    With --shard k/N, N workers (one per GPU or vLLM server) each write RUN/iterN/pairs.shard-k-of-N.jsonl;
    this command without --shard (or `esc-evolve run --resume`) then merges them, in the order one worker would
    have written, and generates what no shard holds. Only generation.* may be overridden (e.g. a worker's own
    --set generation.openai.base_url=...): what is generated stays the run's.
    """
    from esc_evolve.evolve.pairs import parse_shard
    from esc_evolve.pipeline.stages import pairs as pairs_stage

    run = open_run(run_dir, overrides, allowed=("generation.",))
    stage = f"iter{iteration}.pairs"
    if run.stage_done(stage):
        console.print(f"[green]already done[/green]: {stage} (in stages.json)")
        return
    if shard is None:
        summary = run_stage_locked(run, stage, lambda r: pairs_stage(r, iteration))
        console.print(f"[green]done[/green]: {stage}, {summary['kept']} of {summary['contexts']} pairs kept")
        return
    k, n = parse_shard(shard)
    summary = pairs_stage(run, iteration, shard=(k, n))
    console.print(
        f"[green]shard {k}/{n} done[/green]: {summary['contexts']} contexts, {summary['kept']} kept; merge with "
        f"`esc-evolve pairs {run_dir} -i {iteration}` once every shard is done"
    )


def open_run(run_dir: Path, overrides: list[str] | None, allowed: tuple[str, ...]) -> RunDir:
    """The run at `run_dir` with its saved config, plus overrides of the sections in `allowed` only."""
    from esc_evolve.config import load_config
    from esc_evolve.errors import ConfigError
    from esc_evolve.logging_setup import setup_logging
    from esc_evolve.pipeline import RunDir, RunLayout

    layout = RunLayout(run_dir)
    if not layout.config_file.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml): give a folder made by `esc-evolve run`")
    others = [o for o in overrides or [] if not o.strip().startswith(allowed)]
    if others:
        raise ConfigError(f"only {', '.join(allowed)}KEY=VALUE overrides apply here, got: {', '.join(others)}")
    config = load_config(layout.config_file, overrides)
    setup_logging(config.run.log_level, layout.log_file)
    return RunDir(layout, config)


def run_stage_locked(run: RunDir, name: str, stage: Callable[[RunDir], dict[str, Any]]) -> dict[str, Any]:
    """One stage as the run's one writer, recorded in stages.json as `esc-evolve run` records it."""
    from esc_evolve.pipeline import RunLock
    from esc_evolve.pipeline.stages import run_stage

    with RunLock(run.layout.lock_file):
        run_stage(run, name, stage)
    return run.stage_summary(name)
