"""`esc-evolve eval RUN`, `esc-evolve eval-responses` and `esc-evolve human-eval export|import`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from esc_evolve.cli.common import SetOption, console, user_errors

if TYPE_CHECKING:
    from esc_evolve.config import DataSettings

human_app = typer.Typer(help="Blinded A/B human evaluation: export sheets, import filled ones.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_run)
    app.command("eval-responses")(eval_responses)
    app.add_typer(human_app, name="human-eval")


def _pairs(values: list[str] | None) -> list[tuple[str, str]] | None:
    if not values:
        return None
    pairs = []
    for value in values:
        a, sep, b = value.partition(":")
        if not sep or not a or not b:
            raise typer.BadParameter(f"expected A:B (e.g. m2:m0), got {value!r}")
        pairs.append((a.strip(), b.strip()))
    return pairs


def _load_table(responses: Path, data: str | None, settings: DataSettings, models: list[str] | None, human: bool):
    from esc_evolve.data import load_split
    from esc_evolve.evaluation.responses import read_responses

    samples = load_split(data, settings).by_id() if data else None
    return read_responses(responses, samples=samples, include_human=human, models=models)


@user_errors
def eval_responses(
    responses: Path = typer.Argument(..., help="responses.jsonl: one row per (sample_id, model)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (report.md, report.html, metrics.json)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Take eval and data settings from here."),
    overrides: list[str] | None = SetOption,
    data: str | None = typer.Option(None, help="Data split to resolve rows that carry no 'sample'."),
    model: list[str] | None = typer.Option(None, "--model", help="Models to compare, in order (repeatable)."),
    human: bool = typer.Option(True, "--human/--no-human", help="Add the human reference as a model."),
) -> None:
    """Evaluate generated responses: reference metrics, strategy behaviour, personalisation, CIs, report.

    Every evaluation setting is in the config's `eval` section: change it with e.g.
    `--set eval.metrics=[bleu,distinct] --set eval.bootstrap_unit=conversation`.
    """
    from esc_evolve.config import load_config
    from esc_evolve.evaluation.report import write_report
    from esc_evolve.pipeline.evaluation import score_table

    cfg = load_config(config, overrides)
    table = _load_table(responses, data, cfg.data, model, human)
    result = score_table(table, cfg, out)
    provenance = {"responses_file": str(responses), "config": cfg.eval.model_dump(mode="json")}
    paths = write_report(result, table, out, provenance)
    console.print(f"[green]evaluated[/green] {len(table)} contexts x {len(table.models)} models -> {paths['html']}")
    _print_notes(result.notes)


@user_errors
def eval_run(
    run_dir: Path = typer.Argument(..., help="A run directory written by `esc-evolve run` (holds config.yaml)."),
    model: list[str] | None = typer.Option(
        None, "--model", "-m", help="base, m0, m1, m2, human (repeatable); default: the run's eval.models that exist."
    ),
    split: str | None = typer.Option(
        None, "--split", help="Contexts to answer: a data file, builtin:valid, hf:...; default eval.split_path."
    ),
    max_contexts: int | None = typer.Option(None, "--max-contexts", min=1, help="Seeded sample of N contexts."),
    overrides: list[str] | None = typer.Option(
        None, "--set", "-s", help="Override an eval setting, e.g. --set eval.judge.backend=local (repeatable)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Report folder; default RUN_DIR (RUN_DIR/report.md)."),
) -> None:
    """(Re-)evaluate a run: every model answers the eval contexts (models already answered are reused), then
    metrics, CIs and the report, as the pipeline's eval stage does. Works on a run that only has m0."""
    from esc_evolve.logging_setup import setup_logging
    from esc_evolve.pipeline import RunLayout, RunLock
    from esc_evolve.pipeline.evaluation import evaluate_run, load_run_config

    cfg = load_run_config(run_dir, overrides)
    if split:  # set on the model, not as a --set string: a path is not parsed as YAML
        cfg.eval.split_path = split
    if max_contexts:
        cfg.eval.max_contexts = max_contexts
    target = RunLayout(out or run_dir)
    setup_logging(cfg.run.log_level, target.root / "logs" / "eval.log")
    provenance = {"command": "esc-evolve eval", "overrides": overrides or [], "split": split, "requested_models": model}
    with RunLock(target.lock_file):  # the folder written is written by one process at a time
        summary = evaluate_run(RunLayout(run_dir), cfg, models=model or None, out=target, provenance=provenance)
    console.print(
        f"[green]evaluated[/green] {summary['contexts']} contexts x {', '.join(summary['models'])} -> "
        f"{summary['report']}"
    )
    _print_notes(summary["notes"])


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)


@human_app.command("export")
@user_errors
def human_export(
    responses: Path = typer.Argument(..., help="responses.jsonl"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for sheet.csv, form.html, key.json."),
    pair: list[str] = typer.Option(..., "--pair", "-p", help="A:B models to compare (repeatable), e.g. m2:m0."),
    n: int = typer.Option(50, "--n", help="Contexts per pair."),
    seed: int = typer.Option(42, help="Shuffling seed."),
    criterion: list[str] | None = typer.Option(None, "--criterion", help="Rating criteria (repeatable)."),
    data: str | None = typer.Option(None, help="Data split to resolve rows that carry no 'sample'."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Data settings for --data (context window)."),
) -> None:
    """Blinded A/B sheets for human raters (CSV + static HTML form) and the hidden key."""
    from esc_evolve.config import load_config
    from esc_evolve.evaluation.human import DEFAULT_CRITERIA, export_sheets

    table = _load_table(responses, data, load_config(config).data, None, True)
    paths = export_sheets(table, _pairs(pair) or [], out, n, seed, tuple(criterion or DEFAULT_CRITERIA))
    console.print(
        f"[green]exported[/green] {paths['sheet.csv']} and {paths['form.html']}; keep {paths['key.json']} "
        "away from the raters"
    )


@human_app.command("import")
@user_errors
def human_import(
    key: Path = typer.Argument(..., help="key.json written by `human-eval export`."),
    sheets: list[Path] = typer.Argument(..., help="Filled CSVs, one per rater."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for human_eval.json and human_eval.md."),
) -> None:
    """Unblind filled sheets: win rates per pair and criterion, inter-rater agreement (Cohen / Fleiss kappa)."""
    from esc_evolve.evaluation.human import import_ratings, render_human_report
    from esc_evolve.storage import write_atomic, write_json_atomic

    result = import_ratings(key, sheets)
    write_json_atomic(out / "human_eval.json", result)
    text = render_human_report(result)
    write_atomic(out / "human_eval.md", text)
    console.print(text, markup=False, highlight=False)
