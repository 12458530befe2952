"""`simulate_models`: the whole simulation for a list of models (the `simulate` command and the run's
`eval.simulate` stage call it): rollouts for every dialogue not finished yet, scores, report."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from esc_evolve.config import ExperimentConfig
from esc_evolve.errors import ConfigError
from esc_evolve.simulation.cards import RoleCard
from esc_evolve.simulation.rollout import (
    Dialogue,
    Supporter,
    TranscriptStore,
    finished_dialogues,
    roll_out,
    rollout_progress,
    tuned_for_dialogues,
)
from esc_evolve.simulation.scores import ScoringTools, load_scoring_tools, score_dialogues
from esc_evolve.simulation.simulator import SeekerSimulator, build_simulator

log = logging.getLogger(__name__)

TRANSCRIPTS_FILE = "transcripts.jsonl"


def simulate_models(
    cards: Sequence[RoleCard],
    supporters: Sequence[Supporter],
    config: ExperimentConfig,
    out: Path,
    *,
    pool: Sequence[RoleCard] | None = None,
    tools: ScoringTools | None = None,
    simulator: SeekerSimulator | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Each supporter talks with each card's seeker (`config.simulate`), then scores and the report go to `out`.

    Finished dialogues in `out/transcripts.jsonl` are reused. `pool`: the card set whose situations serve as
    distractors (default `cards`). `tools` and `simulator` are built from the config unless given (tests)."""
    from esc_evolve.evaluation.settings import EvaluationSettings
    from esc_evolve.simulation.report import write_simulation_report

    names = [s.name for s in supporters]
    if not supporters or len(set(names)) != len(names):
        raise ConfigError(f"simulate needs one or more models with distinct names, got: {', '.join(names) or 'none'}")
    settings = EvaluationSettings.for_experiment(config)
    tools = tools or load_scoring_tools(settings)
    store = TranscriptStore(Path(out) / TRANSCRIPTS_FILE)
    owned = simulator is None
    simulator = simulator or build_simulator(config.simulate, config.model, config.generation, seed=config.run.seed)
    try:
        dialogues = _roll_out_all(cards, supporters, simulator, tools, store, config, progress)
    finally:
        if owned:
            simulator.close()
    scores = score_dialogues(dialogues, cards, names, tools.embedder, settings, pool=pool)
    paths = write_simulation_report(scores, dialogues, cards, Path(out), config, simulator.description)
    log.info("simulation report: %s", paths["html"])
    return {"cards": len(scores.cards), "models": names, "report": str(paths["html"]), "scores": str(paths["json"])}


def _roll_out_all(
    cards: Sequence[RoleCard],
    supporters: Sequence[Supporter],
    simulator: SeekerSimulator,
    tools: ScoringTools,
    store: TranscriptStore,
    config: ExperimentConfig,
    progress: bool,
) -> list[Dialogue]:
    """Every supporter's dialogues with `cards`: finished ones from the store, the rest rolled out (one model at a
    time, its generator closed before the next is loaded) and saved after each model."""
    turns = config.simulate.turns
    result: list[Dialogue] = []
    bar = rollout_progress(progress)
    with bar or contextlib.nullcontext():
        for supporter in supporters:
            done = finished_dialogues(store, supporter, simulator.description, turns)
            todo = [c for c in cards if c.id not in done]
            result += [done[c.id] for c in cards if c.id in done]
            if not todo:
                log.info("simulate: %s has finished all %d dialogues, skipped", supporter.name, len(cards))
                continue
            log.info("simulate: %s with %d cards (%d already finished)", supporter.name, len(todo), len(done))
            advance = None
            if bar is not None:
                advance = functools.partial(bar.advance, bar.add_task(f"simulating {supporter.name}", total=turns + 1))
            step = _step_reporter(supporter.name, turns + 1, advance)
            with (
                supporter.build() as generator,
                tuned_for_dialogues(config.simulate, len(todo), generator, simulator.generator),
            ):
                new = roll_out(
                    todo,
                    supporter,
                    generator,
                    simulator,
                    tools.classify,
                    turns=turns,
                    seed=config.run.seed,
                    on_step=step,
                )
            store.replace(new)
            result += new
    return result


def _step_reporter(model: str, total: int, advance: Callable[[], Any] | None) -> Callable[[], None]:
    """Advance the bar (a terminal) and log each step (simulate.log): a step is one supporter turn with the
    seeker's answer, or the end ratings; a model's rollout can take many minutes with nothing else written."""
    started, done = time.monotonic(), 0

    def step() -> None:
        nonlocal done
        done += 1
        if advance is not None:
            advance()
        log.info("simulate: %s step %d/%d done (%.0f s)", model, done, total, time.monotonic() - started)

    return step
