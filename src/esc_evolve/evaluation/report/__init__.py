"""Writing an evaluation to OUT/: metrics.json (numbers + provenance), report.md, report.html, plots/*.png.

The report is built once as blocks (`blocks`) and rendered twice (`render`), so that the Markdown and the
self-contained HTML always say the same thing; `metrics_json` holds the same numbers for machines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esc_evolve.evaluation.evaluate import EvalResult
from esc_evolve.evaluation.report.blocks import REFLECTION_HEADING, Block, build_blocks, fmt, fmt_interval
from esc_evolve.evaluation.report.metrics_json import metrics_json, reflection_accuracy_json
from esc_evolve.evaluation.report.plots import make_plots
from esc_evolve.evaluation.report.render import render_html, render_markdown
from esc_evolve.evaluation.responses import ResponsesTable
from esc_evolve.storage import write_atomic, write_json_atomic

__all__ = [
    "REFLECTION_HEADING",
    "Block",
    "build_blocks",
    "fmt",
    "fmt_interval",
    "metrics_json",
    "reflection_accuracy_json",
    "render_html",
    "render_markdown",
    "write_report",
]


def write_report(
    result: EvalResult,
    table: ResponsesTable,
    out_dir: Path,
    provenance: dict[str, Any] | None = None,
    reflections: dict[str, EvalResult] | None = None,
) -> dict[str, Any]:
    """Write every output file; returns the paths written (metrics, markdown, html, plots).

    `reflections`: label -> the `reflection` metric's result on one self-evolution iteration's reflections (e.g.
    "iter1: m0 on 24 training contexts"); shown as the reflection-accuracy section and in metrics.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = make_plots(result, out_dir / "plots")
    write_json_atomic(out_dir / "metrics.json", metrics_json(result, provenance or {}, reflections))
    blocks = build_blocks(result, table, images, reflections)
    write_atomic(out_dir / "report.md", render_markdown(blocks, out_dir))
    write_atomic(out_dir / "report.html", render_html(blocks))
    return {
        "metrics": out_dir / "metrics.json",
        "markdown": out_dir / "report.md",
        "html": out_dir / "report.html",
        "plots": list(images.values()),
    }
