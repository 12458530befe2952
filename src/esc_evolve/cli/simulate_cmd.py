"""`esc-evolve simulate`: models talk with simulated seekers (role cards), scored for personalisation."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from esc_evolve.cli.common import SetOption, console, user_errors

if TYPE_CHECKING:
    from esc_evolve.config import ExperimentConfig
    from esc_evolve.simulation.rollout import Supporter


def register(app: typer.Typer) -> None:
    """Add the `simulate` command to `app`."""
    app.command("simulate")(simulate)


@user_errors
def simulate(
    models: list[str] = typer.Option(
        ...,
        "--model",
        "-m",
        help="A model to test (repeatable, in report order; the first is the baseline of the differences): a "
        "backbone (alias, folder, hub id), a LoRA adapter folder, a run's m0/ or iterN/mN/, or a run directory "
        "(its newest model).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for transcripts.jsonl, scores.json/md, report.html."),
    cards: Path | None = typer.Option(
        None, "--cards", help="A role-card file; default simulate.cards_path, else the packaged cards."
    ),
    turns: int | None = typer.Option(None, "--turns", min=1, help="Supporter turns per dialogue (simulate.turns, 8)."),
    max_cards: int | None = typer.Option(None, "--max-cards", min=1, help="A seeded sample of N cards."),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML config; default: the run's own config when the first model is a run's."
    ),
    overrides: list[str] | None = SetOption,
) -> None:
    """Every MODEL talks with every card's simulated seeker; scores with paired CIs and a report go to OUT.
    Finished dialogues in OUT are not rerun (docs/simulation.md)."""
    from esc_evolve.logging_setup import setup_logging
    from esc_evolve.simulation import load_role_cards
    from esc_evolve.simulation.rollout import select_cards
    from esc_evolve.simulation.runner import simulate_models

    supporters, cfg = resolve_supporters(models, config, overrides)
    fields = {"turns": turns, "max_cards": max_cards, "cards_path": str(cards) if cards else None}
    cfg = cfg.model_copy(
        update={"simulate": cfg.simulate.model_copy(update={k: v for k, v in fields.items() if v is not None})}
    )
    setup_logging(cfg.run.log_level, out / "simulate.log")
    pool = load_role_cards(cfg.simulate.cards_path)
    chosen = select_cards(pool, cfg.simulate.max_cards, cfg.run.seed)
    summary = simulate_models(chosen, supporters, cfg, out, pool=pool)
    console.print(
        f"[green]simulated[/green] {summary['cards']} cards x {len(supporters)} models -> {summary['report']}",
        highlight=False,
    )


def resolve_supporters(
    models: list[str], config: Path | None, overrides: list[str] | None
) -> tuple[list[Supporter], ExperimentConfig]:
    """Each MODEL resolved as chat/serve do (cli/model_arg.py), with its own config (a run's model: that run's),
    and the first model's config, which sets the simulation."""
    from esc_evolve.cli.model_arg import resolve_model
    from esc_evolve.generation import build_generator
    from esc_evolve.simulation.rollout import Supporter

    supporters: list[Supporter] = []
    first: ExperimentConfig | None = None
    for model in models:
        cfg, model_config, adapter, label = resolve_model(model, config, overrides)
        first = first or cfg
        name = _unique(_short_name(model, adapter), {s.name for s in supporters})
        build = functools.partial(build_generator, model_config, cfg.generation, adapter, seed=cfg.run.seed)
        supporters.append(Supporter(name, label, build, cfg.data.system_prompt))
    assert first is not None  # typer requires at least one --model
    return supporters, first


def _short_name(model: str, adapter: Path | None) -> str:
    """The name in tables: a run's model is m0, m2, ...; an adapter or model folder its folder name."""
    if adapter is not None:
        return adapter.name
    folder = Path(model).expanduser()
    return folder.name if folder.is_dir() else model


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate
