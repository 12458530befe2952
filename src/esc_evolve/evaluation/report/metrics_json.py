"""metrics.json: every estimate, CI, difference and win rate of an evaluation, with its provenance."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np

from esc_evolve.evaluation.evaluate import EvalResult
from esc_evolve.evaluation.report.reflections import reflection_rows
from esc_evolve.evaluation.stats import Interval
from esc_evolve.provenance import git_commit, library_versions, now


def metrics_json(
    result: EvalResult, provenance: dict[str, Any], reflections: dict[str, EvalResult] | None = None
) -> dict[str, Any]:
    data = {
        "provenance": {
            "created": now(),
            "n_contexts": result.n_contexts,
            "n_conversations": result.n_conversations,
            "models": result.models,
            "settings": result.settings.model_dump(mode="json"),
            "versions": library_versions(),
            "python": platform.python_version(),
            "git_commit": git_commit(),
            **provenance,
        },
        "metrics": {
            s.name: {"description": s.description, "higher_is_better": s.higher_is_better, "percent": s.percent}
            for s in result.submetrics
        },
        "estimates": {m: {k: interval_json(v) for k, v in est.items()} for m, est in result.estimates.items()},
        "differences": [
            {
                "a": d.a,
                "b": d.b,
                "metric": d.metric,
                **interval_json(d.interval),
                "significant": d.significant,
                "favours": d.winner,
            }
            for d in result.differences
        ],
        "win_rates": [
            {
                "a": w.a,
                "b": w.b,
                **interval_json(w.interval),
                "n": w.n,
                "wins": w.wins,
                "ties": w.ties,
                "losses": w.losses,
                "significant": w.significant,
            }
            for w in result.win_rates
        ],
        "headline": list(result.headline) if result.headline else None,
        "details": jsonable(result.info),
        "notes": result.notes,
    }
    accuracy = reflection_accuracy_json(reflections or {})
    if accuracy:
        data["reflection_accuracy"] = accuracy
    return data


def reflection_accuracy_json(reflections: dict[str, EvalResult]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{row label: {submetric: {value, ci_low, ci_high}}} for the reflections of the self-evolution iterations."""
    return {
        row.label: {sub.name: interval_json(row.estimates[sub.name]) for sub in row.submetrics}
        for row in reflection_rows(reflections)
    }


def interval_json(iv: Interval) -> dict[str, float | None]:
    return {
        k: (None if not np.isfinite(v) else float(v))
        for k, v in (("value", iv.value), ("ci_low", iv.low), ("ci_high", iv.high))
    }


def jsonable(value: Any) -> Any:
    """`value` with numpy numbers as Python ones and NaN/inf as null (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
