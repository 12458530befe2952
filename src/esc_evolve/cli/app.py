"""`esc-evolve` command line. Each command parses its options and calls one function of a stage package."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from esc_evolve.cli.common import SetOption, console, err_console, user_errors

app = typer.Typer(
    help="Self-evolution of LLMs into personalised emotional supporters (Ye et al., 2025).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect emotional-support data.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")


@config_app.command("show")
@user_errors
def config_show(
    config: Path | None = typer.Argument(None, help="YAML config; omit to see the defaults."),
    overrides: list[str] | None = SetOption,
) -> None:
    """Print the resolved config (file + extends + --set + defaults), validated."""
    from esc_evolve.config import dump_config, load_config

    console.print(dump_config(load_config(config, overrides)), markup=False, highlight=False)


@data_app.command("stats")
@user_errors
def data_stats(
    path: str = typer.Argument(..., help="Data file, builtin:train|valid|all, or hf:REPO[:SPLIT]."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Take the data settings from here."),
    overrides: list[str] | None = SetOption,
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip malformed records, report a count."),
) -> None:
    """Counts of conversations, turns, strategies, emotions, problems and lengths (samples cut with the config's
    data.context_window)."""
    from esc_evolve.cli.render import print_stats

    print_stats(console, _load(path, config, overrides, skip_invalid)[0])


@data_app.command("preview")
@user_errors
def data_preview(
    path: str = typer.Argument(..., help="Data file, builtin:train|valid|all, or hf:REPO[:SPLIT]."),
    n: int = typer.Option(3, "--n", help="How many samples to show."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Take model and data settings from here."),
    overrides: list[str] | None = SetOption,
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip malformed records."),
) -> None:
    """Show turn-level samples exactly as the model sees them (rendered with its chat template)."""
    from esc_evolve.cli.render import print_preview

    split, cfg = _load(path, config, overrides, skip_invalid)
    print_preview(console, split, n, cfg)


def _load(path: str, config: Path | None, overrides: list[str] | None, skip_invalid: bool):
    """The split at `path` read with the config's data settings (`--skip-invalid` on top), and the config."""
    from esc_evolve.config import load_config
    from esc_evolve.data import load_split

    cfg = load_config(config, [*(overrides or []), *(["data.skip_invalid=true"] if skip_invalid else [])])
    return load_split(path, cfg.data), cfg


@app.command("run")
@user_errors
def run(
    config: Path = typer.Argument(..., help="YAML config, e.g. configs/quickstart.yaml."),
    overrides: list[str] | None = SetOption,
    resume: bool = typer.Option(False, "--resume", help="Continue an existing run directory."),
) -> None:
    """Run the whole method: prepare, SFT (M0), self-evolution iterations (pairs, DPO: M1, M2, ...), evaluation."""
    from esc_evolve.config import load_config
    from esc_evolve.pipeline import run_pipeline

    run_dir = run_pipeline(load_config(config, overrides), resume=resume)
    console.print(f"[green]done[/green]: {run_dir}")


@app.command("stage", hidden=True)
@user_errors
def stage(
    run_dir: Path = typer.Argument(..., help="The run directory whose orchestrator started this process."),
    name: str = typer.Argument(..., help="The stage, as named in stages.json (e.g. iter1.pairs)."),
) -> None:
    """One stage for `esc-evolve run` (run.stage_processes), which holds the run's lock and records the stage;
    by hand, use sft, pairs, dpo or eval."""
    from esc_evolve.pipeline.processes import run_one_stage

    run_one_stage(run_dir, name)


def _register_stage_commands() -> None:
    """Commands of the stage packages, each in its own module (imported here, after the shared helpers)."""
    from esc_evolve.cli import (
        chat_cmd,
        compare_cmd,
        dpo_cmd,
        eval_cmd,
        export_cmd,
        generate_cmd,
        pairs_cmd,
        safety_cmd,
        serve_cmd,
        sft_cmd,
        simulate_cmd,
    )

    sft_cmd.register(app)
    generate_cmd.register(app)
    eval_cmd.register(app)
    safety_cmd.register(app)
    chat_cmd.register(app)
    serve_cmd.register(app)
    export_cmd.register(app)
    simulate_cmd.register(app)
    compare_cmd.register(app)
    pairs_cmd.register(app)
    dpo_cmd.register(app)


_register_stage_commands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun with --resume to continue where it stopped")
        sys.exit(130)


if __name__ == "__main__":
    main()
