"""The simulation's outputs: scores.json (every estimate, CI, difference, per-dialogue value and provenance),
scores.md and report.html (the same blocks, rendered by the evaluation report's renderers: the table, the paired
differences, a plot per score, and the first and last model's transcripts with one card side by side), plots/."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from esc_evolve.config import ExperimentConfig
from esc_evolve.evaluation.report.blocks import Block, fmt_interval
from esc_evolve.evaluation.report.render import render_html, render_markdown
from esc_evolve.evaluation.stats import Interval
from esc_evolve.provenance import environment
from esc_evolve.simulation.cards import RoleCard
from esc_evolve.simulation.rollout import Dialogue, TurnRecord
from esc_evolve.simulation.scores import SCORES, SimulationScores
from esc_evolve.storage import write_atomic, write_json_atomic

TITLE = "Simulated seekers: does it personalise?"


def write_simulation_report(
    scores: SimulationScores,
    dialogues: Sequence[Dialogue],
    cards: Sequence[RoleCard],
    out: Path,
    config: ExperimentConfig,
    simulator: str,
) -> dict[str, Path]:
    """scores.json, scores.md, report.html and plots/ under `out`; their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "scores.json", "md": out / "scores.md", "html": out / "report.html"}
    write_json_atomic(paths["json"], scores_json(scores, dialogues, config, simulator))
    images = plot_scores(scores, out / "plots")
    blocks = report_blocks(scores, dialogues, cards, images, simulator, config)
    markdown = render_markdown(blocks, out).replace(f"## {TITLE}", f"# {TITLE}", 1)
    write_atomic(paths["md"], markdown)
    page = render_html(blocks).replace(f"<h2>{TITLE}</h2>", f"<h1>{TITLE}</h1>", 1)
    write_atomic(paths["html"], page.replace("<title>Evaluation report</title>", f"<title>{TITLE}</title>", 1))
    return paths


def _interval(iv: Interval) -> dict[str, float | None]:
    return {"value": _num(iv.value), "ci_low": _num(iv.low), "ci_high": _num(iv.high)}


def scores_json(
    scores: SimulationScores, dialogues: Sequence[Dialogue], config: ExperimentConfig, simulator: str
) -> dict[str, Any]:
    wanted = {(m, c) for m in scores.models for c in scores.cards}
    per_dialogue = [
        {
            "model": model,
            "card_id": card,
            **{s.name: _num(scores.values[model][s.name][i]) for s in SCORES},
        }
        for model in scores.models
        for i, card in enumerate(scores.cards)
    ]
    n_values = {m: {s.name: int(np.isfinite(scores.values[m][s.name]).sum()) for s in SCORES} for m in scores.models}
    return {
        "models": scores.models,
        "cards": scores.cards,
        "scores": {m: {k: _interval(v) for k, v in scores.estimates[m].items()} for m in scores.models},
        "n": n_values,
        "differences_vs_first": {
            m: {k: _interval(v) for k, v in diffs.items()} for m, diffs in scores.differences.items()
        },
        "definitions": {
            s.name: {"description": s.description, "higher_is_better": s.higher_is_better, "range": [s.low, s.high]}
            for s in SCORES
        },
        **scores.info,
        "simulator": simulator,
        "n_dialogues": sum((d.model, d.card_id) in wanted for d in dialogues),
        "settings": {
            "simulate": config.simulate.model_dump(mode="json"),
            "seed": config.run.seed,
            "bootstrap_samples": config.eval.bootstrap_samples,
            "ci_level": config.eval.ci_level,
            "situation_distractors": config.eval.situation_distractors,
        },
        "per_dialogue": per_dialogue,
        "provenance": environment(),
    }


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


# ---------------------------------------------------------------------------------------------------------
# Blocks


def report_blocks(
    scores: SimulationScores,
    dialogues: Sequence[Dialogue],
    cards: Sequence[RoleCard],
    images: dict[str, Path],
    simulator: str,
    config: ExperimentConfig,
) -> list[Block]:
    first = scores.models[0]
    info = scores.info
    chance = info["chance"]
    blocks = [
        Block("heading", TITLE),
        Block(
            "text",
            f"{len(scores.cards)} role cards ({info['n_risk_cards']} at risk), {config.simulate.turns} supporter "
            f"turns each; models: {', '.join(scores.models)}; seekers played by {simulator}. Intervals are "
            f"{config.eval.ci_level:.0%} percentile bootstrap CIs over cards ({config.eval.bootstrap_samples} "
            f"resamples, seed {config.run.seed}); differences are paired (same cards, same resamples). Scores on "
            "simulated seekers are a development signal, not evidence that real seekers feel helped; a small "
            "simulator plays its cards poorly (docs/simulation.md).",
        ),
        Block("heading", "Scores"),
        Block("table", _score_table(scores)),
        Block(
            "text",
            f"- chance levels: preference_alignment {_f(chance['preference_alignment'])} (a supporter picking one of "
            f"the eight strategies at random), situation_id {_f(chance['situation_id'])} (K = {info['distractors']} "
            "distractors), emotion_named: the rate at which the same turns name another emotion, "
            + ", ".join(f"{m} {_f(v)}" for m, v in info["emotion_chance"].items())
            + "\n- end ratings parsed: "
            + "; ".join(f"{m}: {_status(s)}" for m, s in info["rating_status"].items()),
        ),
    ]
    if scores.differences:
        blocks += [Block("heading", f"Paired differences vs {first}"), Block("table", _difference_table(scores))]
    blocks += [Block("heading", "Plots")] + [Block("image", (caption, path)) for caption, path in images.items()]
    blocks += transcript_blocks(scores, dialogues, cards)
    return blocks


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _status(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts.items() if n)


def _score_table(scores: SimulationScores) -> tuple[list[str], list[list[str]]]:
    header = ["score", *scores.models]
    rows = []
    for s in SCORES:
        arrow = "↑" if s.higher_is_better else "↓"
        rows.append([f"{s.name} {arrow}", *(fmt_interval(scores.estimates[m][s.name], False) for m in scores.models)])
    return header, rows


def _difference_table(scores: SimulationScores) -> tuple[list[str], list[list[str]]]:
    first = scores.models[0]
    others = list(scores.differences)
    rows = []
    for s in SCORES:
        cells = []
        for m in others:
            iv = scores.differences[m][s.name]
            mark = ""
            if iv.excludes(0.0):
                better = (iv.value > 0) == s.higher_is_better
                mark = f" **favours {m if better else first}**"
            cells.append(fmt_interval(iv, False) + mark)
        rows.append([s.name, *cells])
    return ["score", *(f"{m} - {first}" for m in others)], rows


def transcript_blocks(
    scores: SimulationScores, dialogues: Sequence[Dialogue], cards: Sequence[RoleCard]
) -> list[Block]:
    """The first and last model on one card, message by message: the card where their preference alignment
    differs most (the first card when they tie), so the table shows what the scores measured."""
    if not scores.cards:
        return []
    first, last = scores.models[0], scores.models[-1]
    gap = np.nan_to_num(
        np.abs(scores.values[last]["preference_alignment"] - scores.values[first]["preference_alignment"]), nan=-1
    )
    card_id = scores.cards[int(np.argmax(gap))]
    card = next(c for c in cards if c.id == card_id)
    by_key = {(d.model, d.card_id): d for d in dialogues}
    left, right = by_key[(first, card_id)], by_key[(last, card_id)]
    profile = (
        f"card {card.id}: {card.emotion} ({card.intensity}/5), {card.problem or card.problem_type}; preferred: "
        f"{', '.join(card.preferred_strategies)}; disliked: {', '.join(card.disliked_strategies)}"
    )
    models = [first] if first == last else [first, last]
    rows = []
    for i in range(max(len(left.turns), len(right.turns))):
        rows.append([str(i + 1), *(_cell(by_key[(m, card_id)].turns, i) for m in models)])
    rows.append(["rating", *(_rating(by_key[(m, card_id)]) for m in models)])
    return [
        Block("heading", f"Transcripts side by side: {' vs '.join(models)}"),
        Block("text", profile),
        Block("table", (["#", *models], rows)),
    ]


def _cell(turns: list[TurnRecord], i: int) -> str:
    if i >= len(turns):
        return ""
    turn = turns[i]
    if turn.speaker == "supporter":
        return f"**supporter** [{turn.strategy} → {turn.reaction}]: {turn.text}"
    asked = f" [{turn.reaction}{', fact offered' if turn.fact is not None else ''}]" if turn.reaction else ""
    return f"**seeker**{asked}: {turn.text}"


def _rating(dialogue: Dialogue) -> str:
    rating = dialogue.rating
    if rating is None:
        return "–"
    value = "–" if rating.value is None else f"{rating.value:g}"
    return f"**{value}** ({rating.status}): {rating.raw}"


# ---------------------------------------------------------------------------------------------------------
# Plots


def plot_scores(scores: SimulationScores, folder: Path) -> dict[str, Path]:
    """One PNG per score: the mean per model with its CI as an error bar (the evaluation report's style), the
    chance level as a dashed line where there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    chance = scores.info["chance"]
    made = {}
    for s in SCORES:
        ivs = [scores.estimates[m][s.name] for m in scores.models]
        vals = np.array([iv.value for iv in ivs])
        if not np.isfinite(vals).any():
            continue
        err = np.nan_to_num(np.vstack([vals - [iv.low for iv in ivs], [iv.high for iv in ivs] - vals]).clip(min=0))
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.bar(scores.models, np.nan_to_num(vals), yerr=err, capsize=3, color="#47a")
        if chance.get(s.name) is not None:
            ax.axhline(chance[s.name], color="#a44", linestyle="--", linewidth=1, label="chance")
            ax.legend(fontsize=8)
        ax.set_ylim(min(s.low, 0.0), s.high)
        ax.set_title(f"{s.name} ({'higher' if s.higher_is_better else 'lower'} better)", fontsize=9)
        ax.tick_params(labelsize=8)
        fig.tight_layout()
        path = folder / f"{s.name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made[s.name] = path
    return made
