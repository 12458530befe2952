"""The compare report: built once as the run report's blocks and rendered by its renderers (Markdown and
self-contained HTML say the same thing); compare.json holds the same numbers for machines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from esc_evolve.evaluation.compare.scoring import Comparison, difference
from esc_evolve.evaluation.registry import SubMetric
from esc_evolve.evaluation.report import Block, fmt, fmt_interval, render_html, render_markdown
from esc_evolve.evaluation.report.metrics_json import interval_json, jsonable
from esc_evolve.evaluation.report.reflections import reflection_rows, reflection_submetrics
from esc_evolve.evaluation.stats import Interval
from esc_evolve.provenance import git_commit, library_versions, now
from esc_evolve.storage import write_atomic, write_json_atomic

TITLE = "Comparison of runs"


def write_comparison(comparison: Comparison, out_dir: Path) -> dict[str, Path]:
    """compare.md, compare.html and compare.json in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = build_blocks(comparison)
    paths = {"markdown": out_dir / "compare.md", "html": out_dir / "compare.html", "json": out_dir / "compare.json"}
    write_atomic(paths["markdown"], render_markdown(blocks, out_dir))
    write_atomic(paths["html"], render_html(blocks).replace("Evaluation report</title>", f"{TITLE}</title>"))
    write_json_atomic(paths["json"], comparison_json(comparison))
    return paths


def build_blocks(c: Comparison) -> list[Block]:
    s = c.result.settings
    blocks = [
        Block("heading", TITLE),
        Block(
            "text",
            f"{c.result.n_contexts} contexts from {c.result.n_conversations} conversations, answered by every row; "
            f"baseline **{c.baseline}**. Intervals are {s.ci_level:.0%} paired percentile bootstrap CIs "
            f"({s.bootstrap_samples} resamples of {s.bootstrap_unit}s, seed {s.seed}); * = the CI excludes 0. "
            "Percent metrics are x100. No correction for multiple comparisons.",
        ),
        Block("heading", "Runs"),
        Block("table", _runs_table(c)),
        Block("heading", "Metrics"),
        Block("table", _metric_table(c, lambda row, sub: c.result.estimates[row].get(sub.name))),
        Block("heading", f"Differences from {c.baseline} (row - baseline)"),
        Block("table", _metric_table(c, lambda row, sub: difference(c.result, row, c.baseline, sub.name), True)),
    ]
    blocks += _length_blocks(c)
    blocks += _seed_blocks(c)
    blocks += _time_blocks(c)
    blocks += _reflection_blocks(c)
    blocks += _pair_blocks(c)
    notes = c.result.notes + c.notes
    if notes:
        blocks += [Block("heading", "Notes"), Block("text", "\n".join(f"- {n}" for n in notes))]
    return blocks


def _runs_table(c: Comparison) -> tuple[list[str], list[list[str]]]:
    group_of = {run.label: g.label for g in c.groups for run in g.runs}
    rows = [
        [
            run.label,
            str(run.layout.root),
            str(run.config.run.seed),
            ", ".join(run.models),
            group_of[run.label],
            run.config.run.m0_from or "own SFT",
        ]
        for run in c.runs
    ]
    return ["run", "path", "seed", "models", "seed group", "M0"], rows


def _header(subs: list[SubMetric]) -> list[str]:
    arrows = {True: " ↑", False: " ↓", None: ""}
    return ["row", *(s.name + (" (%)" if s.percent else "") + arrows[s.higher_is_better] for s in subs)]


def _metric_table(c: Comparison, get: Any, significance: bool = False) -> tuple[list[str], list[list[str]]]:
    subs = c.result.submetrics
    rows = []
    for row in c.table.models:
        if significance and row == c.baseline:
            continue
        rows.append([row, *(_cell(get(row, sub), sub, significance) for sub in subs)])
    return _header(subs), rows


def _cell(iv: Interval | None, sub: SubMetric, significance: bool) -> str:
    text = fmt_interval(iv, sub.percent, sub.digits)
    return text + (" *" if significance and iv is not None and iv.excludes(0.0) else "")


def _as_interval(entry: dict[str, Any] | None) -> Interval | None:
    if not entry:
        return None
    return Interval(*(np.nan if entry[k] is None else entry[k] for k in ("value", "ci_low", "ci_high")))


def _length_blocks(c: Comparison) -> list[Block]:
    subs = [s for s in c.result.submetrics if any(s.name in v for v in c.length_controlled.values())]
    if not subs:
        return []
    rows = [
        [row, *(_cell(_as_interval(values.get(s.name)), s, True) for s in subs)]
        for row, values in c.length_controlled.items()
    ]
    return [
        Block("heading", f"Length-controlled differences from {c.baseline}"),
        Block(
            "text",
            "The intercept of a per-context regression of (row - baseline) on the difference in reply length "
            "(words): the difference at equal length. Per-context metrics only; a difference that vanishes here "
            "was bought with length.",
        ),
        Block("table", (_header(subs), rows)),
    ]


def _seed_blocks(c: Comparison) -> list[Block]:
    if not c.seeds:
        return []
    subs = [s for s in c.result.submetrics if any(s.name in v for v in c.seeds.values())]
    rows = []
    for row, values in c.seeds.items():
        rows.append([row, *(_seed_cell(values.get(s.name), s) for s in subs)])
    return [
        Block("heading", "Seeds pooled"),
        Block(
            "text",
            "Per model of a group of seeds: mean ± sd of the per-seed values (n seeds); Δ = the pooled difference from "
            f"{c.baseline} (bootstrap over seeds and contexts), then ℓ = the same controlled for length.",
        ),
        Block("table", (_header(subs), rows)),
    ]


def _seed_cell(entry: dict[str, Any] | None, sub: SubMetric) -> str:
    if not entry:
        return "–"
    mean, sd = (fmt(entry[k], sub.percent, sub.digits) for k in ("mean", "sd"))
    text = f"{mean} ± {sd} (n={entry['seeds']})"
    if "pooled_difference" in entry:
        text += "; Δ " + _cell(_as_interval(entry["pooled_difference"]), sub, True)
    if "length_controlled_difference" in entry:
        text += "; ℓ " + _cell(_as_interval(entry["length_controlled_difference"]), sub, True)
    return text


def _time_blocks(c: Comparison) -> list[Block]:
    if not c.generation_time:
        return []
    rows = [
        [row, str(t["replies"]), f"{t['seconds']:.1f}", f"{t['seconds_per_reply']:.3f}"]
        for row, t in c.generation_time.items()
    ]
    return [
        Block("heading", "Generation time per reply"),
        Block("text", "Wall time of each row's eval replies (model loading included), from eval/generation_time.json."),
        Block("table", (["row", "replies", "seconds", "seconds per reply"], rows)),
    ]


def _reflection_blocks(c: Comparison) -> list[Block]:
    rows = [(run, row) for run, results in c.reflections.items() for row in reflection_rows(results)]
    if not rows:
        return []
    subs = reflection_submetrics([row for _, row in rows])
    table = [
        [
            f"{run} {row.label}",
            *(fmt_interval(row.estimates.get(s.name), s.percent, s.digits) for s in subs),
            str(row.n),
        ]
        for run, row in rows
    ]
    return [
        Block("heading", "Reflection accuracy per iteration (M_t's reflections on its training contexts, vs gold)"),
        Block("table", (["run iteration", *(s.name + (" (%)" if s.percent else "") for s in subs), "n"], table)),
    ]


def _pair_blocks(c: Comparison) -> list[Block]:
    rows = []
    for run, iterations in c.pairs.items():
        for it in iterations:
            kept = it["kept_pairs"]
            reasons = ", ".join(f"{k} {v}" for k, v in it["dropped_by_reason"].items()) or "–"
            rows.append(
                [
                    run,
                    str(it["iteration"]),
                    str(it["contexts"]),
                    str(it["kept"]),
                    str(it["dropped"]),
                    reasons,
                    fmt(kept["chosen_words"], False, 1),
                    fmt(kept["rejected_words"], False, 1),
                    fmt(kept["similarity"], False, 3),
                    "–" if it["dpo_steps"] is None else str(it["dpo_steps"]),
                    fmt(it["reward_accuracy_last"], False, 3),
                ]
            )
    if not rows:
        return []
    header = [
        "run",
        "iteration",
        "contexts",
        "kept",
        "dropped",
        "drop reasons",
        "chosen words (kept)",
        "rejected words (kept)",
        "similarity (kept)",
        "DPO steps",
        "reward accuracy (last)",
    ]
    return [
        Block("heading", "Pairs per iteration"),
        Block(
            "text",
            "Similarity = 1 - word-level edit distance between chosen and rejected (the too_similar filter's "
            "measure); lengths in words; over the kept pairs, which DPO trains on.",
        ),
        Block("table", (header, rows)),
    ]


def comparison_json(c: Comparison) -> dict[str, Any]:
    result = c.result
    rows = c.table.models
    return jsonable(
        {
            "provenance": {
                "created": now(),
                "runs": {run.label: str(run.layout.root) for run in c.runs},
                "n_contexts": result.n_contexts,
                "settings": result.settings.model_dump(mode="json"),
                "versions": library_versions(),
                "git_commit": git_commit(),
            },
            "baseline": c.baseline,
            "rows": rows,
            "seed_groups": {g.label: [run.label for run in g.runs] for g in c.groups},
            "metrics": {
                s.name: {"description": s.description, "higher_is_better": s.higher_is_better, "percent": s.percent}
                for s in result.submetrics
            },
            "estimates": {m: {k: interval_json(v) for k, v in result.estimates[m].items()} for m in rows},
            "differences": {
                m: {
                    s.name: {**interval_json(iv), "significant": iv.excludes(0.0)}
                    for s in result.submetrics
                    if (iv := difference(result, m, c.baseline, s.name)) is not None
                }
                for m in rows
                if m != c.baseline
            },
            "length_controlled": c.length_controlled,
            "seeds": c.seeds,
            "generation_time": c.generation_time,
            "reflection_accuracy": {
                run: {
                    row.label: {s.name: interval_json(row.estimates[s.name]) for s in row.submetrics}
                    for row in reflection_rows(results)
                }
                for run, results in c.reflections.items()
            },
            "pairs": c.pairs,
            "notes": result.notes + c.notes,
        }
    )
