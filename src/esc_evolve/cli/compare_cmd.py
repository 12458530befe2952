"""`esc-evolve compare RUN [RUN ...] --out DIR`: one table and report across runs evaluated on the same contexts."""

from __future__ import annotations

from pathlib import Path

import typer

from esc_evolve.cli.common import console, user_errors


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)


@user_errors
def compare(
    runs: list[Path] = typer.Argument(
        ..., help="Run directories evaluated on the same contexts (eval/responses.jsonl)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for compare.md, compare.html and compare.json."),
    baseline: str | None = typer.Option(
        None, "--baseline", "-b", help="The row every other is compared with, RUN:MODEL; default the first run's m0."
    ),
    overrides: list[str] | None = typer.Option(
        None,
        "--set",
        "-s",
        help="Override an eval setting of the first run's config, e.g. --set eval.bootstrap_samples=2000.",
    ),
) -> None:
    """Compare runs: every model of every run as a row, every metric as a column, paired bootstrap CIs against a
    baseline row, length-controlled differences, seeds of one config pooled, reflection accuracy and pair
    statistics per iteration."""
    from esc_evolve.evaluation.compare import compare_runs, write_comparison
    from esc_evolve.logging_setup import setup_logging

    setup_logging("INFO", out / "compare.log")
    comparison = compare_runs(runs, baseline, overrides, out)
    paths = write_comparison(comparison, out)
    console.print(
        f"[green]compared[/green] {len(comparison.table.models)} rows on {len(comparison.table)} contexts "
        f"against {comparison.baseline} -> {paths['html']}"
    )
