"""The reflection-accuracy section: what each self-evolution iteration's reflections got right, one row each.

Its input is a label per iteration (e.g. "iter1: m0 on 24 training contexts") and the `EvalResult` of the
`reflection` metric on that iteration's reflections; the report and metrics.json show the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from esc_evolve.evaluation.evaluate import EvalResult
from esc_evolve.evaluation.metrics.reflection import SUBMETRICS
from esc_evolve.evaluation.registry import SubMetric
from esc_evolve.evaluation.stats import Interval

_NAMES = {s.name for s in SUBMETRICS}


@dataclass(frozen=True)
class ReflectionRow:
    label: str
    submetrics: list[SubMetric]  # the reflection metric's submetrics that have a value, in metric order
    estimates: dict[str, Interval]
    n: int  # contexts of the table


def reflection_rows(reflections: dict[str, EvalResult]) -> list[ReflectionRow]:
    """One row per label and model with reflection scores (a label whose table held several such models gets
    one row per model, named "label (model)"); labels without any reflection score give no row."""
    rows = []
    for label, result in reflections.items():
        subs = [s for s in result.submetrics if s.name in _NAMES]
        models = [m for m in result.models if any(s.name in result.estimates[m] for s in subs)]
        for model in models:
            estimates = result.estimates[model]
            name = label if len(models) == 1 else f"{label} ({model})"
            have = [s for s in subs if s.name in estimates]
            rows.append(ReflectionRow(name, have, {s.name: estimates[s.name] for s in have}, result.n_contexts))
    return rows


def reflection_submetrics(rows: list[ReflectionRow]) -> list[SubMetric]:
    """The columns: every submetric some row has, in the reflection metric's order."""
    present = {s.name for row in rows for s in row.submetrics}
    return [s for s in SUBMETRICS if s.name in present]
