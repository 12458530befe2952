"""The report's sections, built once from an EvalResult as a list of blocks (heading, text, table, image,
example) that `render` turns into Markdown and HTML, so that both always say the same thing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from esc_evolve.evaluation.evaluate import EvalResult
from esc_evolve.evaluation.report.reflections import reflection_rows, reflection_submetrics
from esc_evolve.evaluation.responses import HUMAN, ResponsesTable
from esc_evolve.evaluation.stats import Interval

TITLE = "Evaluation report"
REFLECTION_HEADING = "Reflection accuracy (what the model inferred while self-evolving, against the gold profile)"


@dataclass
class Block:
    kind: str  # heading | text | table | image | example
    content: Any


def fmt(value: float | None, percent: bool, digits: int = 3) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    return f"{100 * value:.1f}" if percent else f"{value:.{digits}f}"


def fmt_interval(iv: Interval | None, percent: bool, digits: int = 3) -> str:
    if iv is None:
        return "–"
    if not np.isfinite(iv.low):
        return fmt(iv.value, percent, digits)
    return f"{fmt(iv.value, percent, digits)} [{fmt(iv.low, percent, digits)}, {fmt(iv.high, percent, digits)}]"


def build_blocks(
    result: EvalResult,
    table: ResponsesTable,
    images: dict[str, Path],
    reflections: dict[str, EvalResult] | None = None,
) -> list[Block]:
    s = result.settings
    blocks = [
        Block("heading", TITLE),
        Block(
            "text",
            f"{result.n_contexts} contexts from {result.n_conversations} conversations; models: "
            f"{', '.join(result.models)}. Intervals are {s.ci_level:.0%} paired percentile bootstrap CIs "
            f"({s.bootstrap_samples} resamples of {s.bootstrap_unit}s, seed {s.seed}). Percent metrics are x100. "
            "No correction for multiple comparisons is applied: read single significant differences among many "
            "metrics with care.",
        ),
    ]
    blocks += _headline_blocks(result)
    blocks += [Block("heading", "Summary"), Block("table", _summary_table(result))]
    blocks += _difference_blocks(result)
    if result.win_rates:
        blocks += [Block("heading", "LLM-judge pairwise win rates"), Block("table", _win_table(result))]
    blocks += _judge_blocks(result)
    blocks += _strategy_blocks(result)
    blocks += _safety_blocks(result)
    blocks += _reflection_blocks(reflections or {})
    for caption, path in images.items():
        blocks.append(Block("image", (caption, path)))
    blocks += _example_blocks(result, table)
    if result.notes:
        blocks += [Block("heading", "Notes"), Block("text", "\n".join(f"- {n}" for n in result.notes))]
    return blocks


def _headline_blocks(result: EvalResult) -> list[Block]:
    if not result.headline:
        return []
    a, b = result.headline
    diffs = [d for d in result.differences if (d.a, d.b) == (a, b)]
    better = [d.metric for d in diffs if d.winner == a]
    worse = [d.metric for d in diffs if d.winner == b]
    neutral = [d.metric for d in diffs if d.significant and d.winner is None]
    flat = [d.metric for d in diffs if not d.significant]
    lines = [
        f"**{a} significantly better than {b}** on: {', '.join(better) or 'none'}",
        f"**{a} significantly worse than {b}** on: {', '.join(worse) or 'none'}",
        f"Significant change without a preferred direction: {', '.join(neutral) or 'none'}",
        f"No significant difference ({len(flat)}): {', '.join(flat) or 'none'}",
    ]
    for w in result.win_rates:
        if {w.a, w.b} == {a, b}:
            rate = w.interval if w.a == a else Interval(1 - w.interval.value, 1 - w.interval.high, 1 - w.interval.low)
            lines.append(
                f"Judge win rate of {a} over {b}: {fmt_interval(rate, True)}%"
                f"{' (significant)' if w.significant else ' (not significant)'}"
            )
    return [Block("heading", f"Headline: {a} vs {b}"), Block("text", "\n".join(f"- {x}" for x in lines))]


def _summary_table(result: EvalResult) -> tuple[list[str], list[list[str]]]:
    header = ["metric", "better", *result.models]
    rows = []
    for sub in result.submetrics:
        arrow = {True: "↑", False: "↓", None: ""}[sub.higher_is_better]
        rows.append(
            [
                sub.name + (" (%)" if sub.percent else ""),
                arrow,
                *(fmt_interval(result.estimates[m].get(sub.name), sub.percent, sub.digits) for m in result.models),
            ]
        )
    return header, rows


def _difference_blocks(result: EvalResult) -> list[Block]:
    blocks = [Block("heading", "Paired differences (a - b)")]
    header = ["a - b", "metric", "difference [CI]", "significant", "favours"]
    rows = []
    for d in result.differences:
        sub = result.submetric(d.metric)
        rows.append(
            [
                f"{d.a} - {d.b}",
                d.metric,
                fmt_interval(d.interval, sub.percent, sub.digits),
                "**yes**" if d.significant else "no",
                d.winner or "",
            ]
        )
    return [*blocks, Block("table", (header, rows))]


def _win_table(result: EvalResult) -> tuple[list[str], list[list[str]]]:
    header = ["A vs B", "win rate of A (%) [CI]", "wins / ties / losses", "n", "significant"]
    rows = [
        [
            f"{w.a} vs {w.b}",
            fmt_interval(w.interval, True),
            f"{w.wins} / {w.ties} / {w.losses}",
            str(w.n),
            "**yes**" if w.significant else "no",
        ]
        for w in result.win_rates
    ]
    return header, rows


_STATUSES = ("ok", "partial", "failed", "error")


def _judge_blocks(result: EvalResult) -> list[Block]:
    """Who judged, how many answers parsed (failures are counted, never dropped), and the judge's unhelpful rate."""
    info = result.info.get("judge")
    if not info:
        return []
    failed = sum(c for k, c in info["status_counts"].items() if k.endswith((":failed", ":error")))
    text = (
        f"Judge: {info['backend']}; {info['judged_contexts']} contexts, {info['calls']} calls, "
        f"**{failed} without a usable answer** (failed: nothing parsed; error: the call raised; partial: some "
        "dimensions missing). Missing scores are left out of the means, never guessed. Unhelpful = helpfulness <= "
        f"{info['unhelpful_threshold']}; '–' = no helpfulness score parsed."
    )
    header = ["model or pair", *_STATUSES, "unhelpful (judge) % [CI]", "helpfulness [CI]"]
    rows = [
        [
            model,
            *_status_cells(counts),
            fmt_interval(result.estimates.get(model, {}).get("unhelpful_judge"), True),
            fmt_interval(result.estimates.get(model, {}).get("judge_helpfulness"), False, 2),
        ]
        for model, counts in info.get("status_by_model", {}).items()
    ]
    pairs = info.get("status_by_pair", {})
    rows += [[f"{pair} (pairwise)", *_status_cells(counts), "", ""] for pair, counts in pairs.items()]
    return [Block("heading", "LLM judge"), Block("text", text), Block("table", (header, rows))]


def _safety_blocks(result: EvalResult) -> list[Block]:
    """Seekers at risk among the contexts (as the safety layer's detector reads them), and how each model answered."""
    info = result.info.get("safety")
    if not info:
        return []
    text = (
        f"The risk detector (docs/safety.md) finds **{info['n_at_risk']} of {info['n_contexts']} contexts** with a "
        "seeker at risk. Resources = the reply points to a crisis line, emergency services, a doctor or a therapist; "
        "unsafe = the reply encourages harm or gives a way to do it (both rule-based floors, over all contexts)."
    )
    header = ["model", "at-risk contexts answered with resources % [CI]", "unsafe replies % [CI]"]
    rows = [
        [
            model,
            fmt_interval(result.estimates.get(model, {}).get("at_risk_resources"), True),
            fmt_interval(result.estimates.get(model, {}).get("unsafe_reply"), True),
        ]
        for model in result.models
    ]
    listed = [
        [c["context"], c["level"], f"{c['score']:.2f}", ", ".join(c["categories"]), _short(c["seeker"], 120)]
        for c in info["at_risk_contexts"]
    ]
    blocks = [Block("heading", "Safety"), Block("text", text), Block("table", (header, rows))]
    if listed:
        blocks.append(Block("table", (["context", "level", "score", "categories", "seeker's last message"], listed)))
    return blocks


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _status_cells(counts: dict[str, int]) -> list[str]:
    return [str(counts.get(status, 0)) for status in _STATUSES]


def _strategy_blocks(result: EvalResult) -> list[Block]:
    info = result.info.get("strategy")
    if not info:
        return []
    clf = info.get("classifier", {})
    valid = clf.get("valid")
    text = (
        f"Strategy classifier: logistic regression on sentence embeddings, trained on {clf.get('n_train', '?')} "
        f"labelled supporter utterances ({clf.get('train_source', '?')})."
    )
    if valid:
        text += (
            f" Held-out ({clf.get('valid_source')}): accuracy {100 * valid['accuracy']:.1f}%, "
            f"macro-F1 {100 * valid['macro_f1']:.1f}% on {valid['n']} utterances."
        )
    text += " The 'human' column applies the classifier to the human responses: the noise floor of these measures."
    names = ["gold", *info["models"]]
    dists = [info["gold_distribution"], *(v["distribution"] for v in info["models"].values())]
    rows = []
    for strategy in info["gold_distribution"]:
        cells = [f"{100 * d[strategy] / max(sum(d.values()), 1):.1f}" for d in dists]
        prefs = [f"{info['models'][m]['preferences'][strategy]:.2f}" for m in info["models"]]
        rows.append([strategy, *cells, *prefs])
    header = ["strategy", *(f"{n} %" for n in names), *(f"pref {m}" for m in info["models"])]
    return [Block("heading", "Strategy behaviour"), Block("text", text), Block("table", (header, rows))]


def _reflection_blocks(reflections: dict[str, EvalResult]) -> list[Block]:
    """One row per self-evolution iteration: how often the reflections it trained on named the gold emotion,
    problem and situation (the reflection metric, with its CIs). Nothing when no iteration is given."""
    rows = reflection_rows(reflections)
    if not rows:
        return []
    subs = reflection_submetrics(rows)
    header = ["iteration", *(s.name + (" (%)" if s.percent else "") for s in subs), "n"]
    cells = [
        [row.label, *(fmt_interval(row.estimates.get(s.name), s.percent, s.digits) for s in subs), str(row.n)]
        for row in rows
    ]
    text = (
        "The reflections each self-evolution iteration wrote on its training contexts, scored against the gold "
        "profile as by the reflection metric: emotion and problem by label matching, the situation by picking the "
        "seeker's own situation among other seekers' ones by embedding similarity. n = contexts."
    )
    return [Block("heading", REFLECTION_HEADING), Block("text", text), Block("table", (header, cells))]


def _example_blocks(result: EvalResult, table: ResponsesTable) -> list[Block]:
    n = min(result.settings.n_examples, len(table))
    if n == 0:
        return []
    rng = np.random.default_rng(result.settings.seed)
    chosen = sorted(rng.choice(len(table), size=n, replace=False).tolist())
    blocks = [Block("heading", "Example responses (same contexts, side by side)")]
    for i in chosen:
        sample = table.samples[i]
        context = [f"{'Seeker' if t.speaker == 'seeker' else 'Supporter'}: {t.text}" for t in sample.context[-4:]]
        p = sample.profile
        profile = f"gold (hidden from models): {p.emotion_type} / {p.problem_type}; situation: {p.situation or '–'}"
        cells = []
        for model in table.models:
            refl = table.reflections[model][i]
            note = ""
            if refl is not None:
                note = "; ".join(
                    f"{k}: {v}"
                    for k, v in (("emotion", refl.emotion), ("problem", refl.problem), ("situation", refl.situation))
                    if v
                )
            cells.append((model if model != HUMAN else "human (reference)", table.responses[model][i], note))
        blocks.append(Block("example", (sample.sample_id, profile, context, cells)))
    return blocks
