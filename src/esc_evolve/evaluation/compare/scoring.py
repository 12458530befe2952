"""The numbers of `esc-evolve compare`: several runs' models in one table, against one baseline row, with
paired bootstrap CIs.

Every run must have answered the same eval contexts (its `eval/responses.jsonl`); each row is a run's model,
`RUN:MODEL` (e.g. `quickstart:m2`), plus the human reference once. The numbers are the eval's own: the rows go
into one responses table that `evaluation.evaluate` scores, so every metric, CI and paired difference is computed
as in a run's report, on one shared set of resamples.

Beyond that table:
- Seeds: runs whose resolved configs differ only in `run.seed` / `run.name` / `run.output_dir` form a group. A
  group of K >= 2 seeds gets, per model, the mean and spread of the per-seed estimates, and a bootstrap pooled
  over seeds and contexts (each resample draws K seeds and n contexts with replacement; the value is the mean
  over the drawn seeds of the metric on the drawn contexts; paired with the baseline on the same contexts).
- Length control: per-context metrics' differences from the baseline are regressed on the difference in reply
  length (words), and the intercept (the difference at equal length) is reported with a bootstrap CI. A
  regression keeps every context and the pairing; length-matched subsets would keep only contexts where both
  replies happen to be of similar length, a selection that depends on the models' own behaviour and differs per
  row. Corpus-level metrics (BLEU, Distinct, strategy distribution) have no per-context value and are not
  length-controlled.
- Per run and iteration: reflection accuracy (the run report's own section, `iteration_reflections`) and pair
  statistics (`evolve.loop.pair_statistics` of iterN/pairs.jsonl, with the DPO numbers of stages.json), and the
  generation time per reply of each model (`eval/generation_time.json`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from esc_evolve.config import ExperimentConfig, dump_config
from esc_evolve.errors import ConfigError, EscEvolveError
from esc_evolve.evaluation.evaluate import EvalResult
from esc_evolve.evaluation.registry import SubMetric
from esc_evolve.evaluation.responses import HUMAN, ResponseRow, ResponsesTable, build_table, read_rows
from esc_evolve.evaluation.stats import Interval, mean_fn, percentile_interval, resample_indices
from esc_evolve.pipeline.layout import RunLayout
from esc_evolve.storage import read_json

log = logging.getLogger(__name__)

ScoreFn = Callable[[np.ndarray], float]
# Fields that differ between seeds of one config by design.
_SEED_FIELDS = ("seed", "name", "output_dir")


@dataclass
class Run:
    """One run directory as compare reads it."""

    label: str  # its row prefix: the folder's name
    layout: RunLayout
    config: ExperimentConfig
    rows: list[ResponseRow]  # its eval responses, on the contexts every one of its models answered
    models: list[str]  # generated models, in eval.models order

    @property
    def contexts(self) -> set[str]:
        return {r.sample_id for r in self.rows}

    def row(self, model: str) -> str:
        return f"{self.label}:{model}"


@dataclass
class SeedGroup:
    label: str
    runs: list[Run]

    def models(self) -> list[str]:
        """The models every seed has."""
        return [m for m in self.runs[0].models if all(m in r.models for r in self.runs)]


@dataclass
class Comparison:
    runs: list[Run]
    groups: list[SeedGroup]
    table: ResponsesTable
    result: EvalResult
    baseline: str
    length_controlled: dict[str, dict[str, dict[str, Any]]]  # row -> submetric -> {value, ci_low, ci_high, ...}
    seeds: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # group row -> submetric -> numbers
    reflections: dict[str, dict[str, EvalResult]] = field(default_factory=dict)  # run -> label -> result
    pairs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # run -> per-iteration statistics
    generation_time: dict[str, dict[str, Any]] = field(default_factory=dict)  # row -> timing
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Reading runs


def load_runs(paths: Sequence[Path], overrides: list[str] | None = None) -> list[Run]:
    """Each run's config (eval.KEY overrides applied) and eval responses; labels made unique by position."""
    from esc_evolve.pipeline.evaluation import load_run_config

    runs, seen = [], set()
    for path in paths:
        config = load_run_config(path, overrides)
        label = path.resolve().name
        if label in seen:
            label = f"{label}#{len(runs) + 1}"
        seen.add(label)
        runs.append(_read_run(label, RunLayout(path), config))
    return runs


def _read_run(label: str, layout: RunLayout, config: ExperimentConfig) -> Run:
    if not layout.responses_file.is_file():
        raise ConfigError(f"{layout.root} has no {layout.responses_file.name}: evaluate it first (esc-evolve eval)")
    rows = read_rows(layout.responses_file)
    answered: dict[str, set[str]] = {}
    for row in rows:
        answered.setdefault(row.model, set()).add(row.sample_id)
    order = [m for m in config.eval.models if m in answered and m != HUMAN]
    models = order + [m for m in answered if m not in order and m != HUMAN]
    common = set.intersection(*(answered[m] for m in models)) if models else set()
    kept = [r for r in rows if r.model in models and r.sample_id in common]
    return Run(label, layout, config, kept, models)


def check_same_contexts(runs: Sequence[Run]) -> None:
    """Refuse runs evaluated on other contexts than the first: paired comparisons need the same ones."""
    first = runs[0]
    problems = []
    for run in runs[1:]:
        only_first, only_this = first.contexts - run.contexts, run.contexts - first.contexts
        if only_first or only_this:
            problems.append(
                f"{run.label} differs from {first.label} on {len(only_first) + len(only_this)} contexts "
                f"({len(only_this)} only in {run.label}, {len(only_first)} only in {first.label})"
            )
    if problems:
        raise ConfigError(
            "runs evaluated on different contexts cannot be compared: "
            + "; ".join(problems)
            + ". Evaluate them on the same split with the same eval.max_contexts and eval.context_seed "
            "(runs that differ in run.seed sample other contexts unless eval.context_seed is set)"
        )


def seed_groups(runs: Sequence[Run]) -> list[SeedGroup]:
    """Runs of one config apart from the seed, in first-seen order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(config_key(run.config), []).append(run)
    return [
        SeedGroup(members[0].label if len(members) == 1 else _group_label(members), members)
        for members in groups.values()
    ]


def _group_label(members: list[Run]) -> str:
    return f"{members[0].label} ({len(members)} seeds)"


def config_key(config: ExperimentConfig) -> str:
    """The resolved config without what differs between seeds (the eval context seed made explicit)."""
    data = yaml.safe_load(dump_config(config))
    if data["eval"].get("context_seed") is None:
        data["eval"]["context_seed"] = config.run.seed
    for name in _SEED_FIELDS:
        data["run"].pop(name, None)
    return yaml.safe_dump(data, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------
# Scoring


def compare_runs(
    paths: Sequence[Path], baseline: str | None = None, overrides: list[str] | None = None, out_dir: Path | None = None
) -> Comparison:
    """Score every run's models on their shared contexts; see the module docstring for what is computed."""
    from esc_evolve.pipeline.evaluation import score_table

    runs = load_runs(paths, overrides)
    check_same_contexts(runs)
    rows = [r.model_copy(update={"model": run.row(r.model)}) for run in runs for r in run.rows]
    labels = [run.row(m) for run in runs for m in run.models]
    include_human = HUMAN in runs[0].config.eval.models
    table = build_table(rows, include_human=include_human, models=labels)
    baseline = baseline or runs[0].row("m0")
    if baseline not in table.models:
        raise ConfigError(f"baseline {baseline!r} is not a row; rows: {', '.join(table.models)}")
    config = _compare_config(runs[0].config, table.models, baseline)
    result = score_table(table, config, out_dir)
    groups = seed_groups(runs)
    comparison = Comparison(runs, groups, table, result, baseline, length_control(result, table, baseline))
    if any(len(g.runs) > 1 for g in groups):
        comparison.seeds = pooled_seeds(groups, table, result, baseline, config)
    _add_run_details(comparison)
    return comparison


def _compare_config(config: ExperimentConfig, models: list[str], baseline: str) -> ExperimentConfig:
    """The first run's config, its judge asked about each row against the baseline."""
    pairs = [(m, baseline) for m in models if m not in (baseline, HUMAN)]
    judge = config.eval.judge.model_copy(update={"pairs": pairs})
    return config.model_copy(update={"eval": config.eval.model_copy(update={"judge": judge, "headline": None})})


def difference(result: EvalResult, a: str, b: str, metric: str) -> Interval | None:
    """value(a) - value(b) with its CI, from the evaluation's paired differences (either order)."""
    found = result.difference(a, b, metric)
    if found is not None:
        return found.interval
    found = result.difference(b, a, metric)
    if found is None:
        return None
    iv = found.interval
    return Interval(-iv.value, -iv.high, -iv.low)


def _resamples(result: EvalResult, table: ResponsesTable) -> list[np.ndarray]:
    """The evaluation's own resamples (same seed, unit and count), so that compare's CIs pair like its CIs."""
    s = result.settings
    groups = table.conversation_groups() if s.bootstrap_unit == "conversation" else None
    return resample_indices(len(table), s.bootstrap_samples, s.seed, groups)


def reply_words(table: ResponsesTable, model: str) -> np.ndarray:
    return np.array([len(text.split()) for text in table.responses[model]], dtype=float)


def length_control(result: EvalResult, table: ResponsesTable, baseline: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Per row and per-context submetric: the intercept of (row - baseline) regressed on the length difference."""
    resamples = _resamples(result, table)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in table.models:
        if row == baseline:
            continue
        lengths = reply_words(table, row) - reply_words(table, baseline)
        out[row] = {}
        for name, values in result.per_context.get(row, {}).items():
            base = result.per_context.get(baseline, {}).get(name)
            if base is None or name == "length" or name.startswith("length_"):
                continue
            fit = intercept_interval([values - base], [lengths], resamples, None, result.settings.ci_level)
            if fit is not None:
                out[row][name] = fit
    return out


def intercept_interval(
    diffs: list[np.ndarray],
    lengths: list[np.ndarray],
    resamples: list[np.ndarray],
    seed_draws: list[np.ndarray] | None,
    level: float,
) -> dict[str, Any] | None:
    """OLS of difference on length difference over the cells (seed k, context i); the intercept and its
    percentile CI over resamples of contexts (and of seeds, when `seed_draws` is given)."""
    every = np.arange(len(diffs[0]))
    point = _ols(diffs, lengths, every, range(len(diffs)))
    if point is None:
        return None
    reps = []
    for b, idx in enumerate(resamples):
        seeds = seed_draws[b] if seed_draws is not None else range(len(diffs))
        fit = _ols(diffs, lengths, idx, seeds)
        reps.append(np.nan if fit is None else fit[0])
    iv = percentile_interval(point[0], np.array(reps), level)
    n = int(sum(np.isfinite(diffs[k]).sum() for k in range(len(diffs))))
    return {"value": iv.value, "ci_low": iv.low, "ci_high": iv.high, "slope_per_word": point[1], "n": n}


def _ols(diffs: list[np.ndarray], lengths: list[np.ndarray], idx: np.ndarray, seeds: Any) -> tuple[float, float] | None:
    y = np.concatenate([diffs[k][idx] for k in seeds])
    x = np.concatenate([lengths[k][idx] for k in seeds])
    keep = np.isfinite(y) & np.isfinite(x)
    y, x = y[keep], x[keep]
    if y.size < 2:
        return None
    if np.ptp(x) == 0:  # one length difference for every context: the intercept is the mean only at zero
        return (float(y.mean()), 0.0) if x[0] == 0 else None
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def pooled_seeds(
    groups: list[SeedGroup], table: ResponsesTable, result: EvalResult, baseline: str, config: ExperimentConfig
) -> dict[str, dict[str, dict[str, Any]]]:
    """For each group of >= 2 seeds and model: per-seed mean and spread, and the pooled bootstrap against the
    baseline (values and differences), for every submetric; and the pooled length-controlled difference."""
    fns = score_functions(table, result, config)
    resamples = _resamples(result, table)
    rng = np.random.default_rng(result.settings.seed + 1)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for group in (g for g in groups if len(g.runs) > 1):
        draws = [rng.integers(0, len(group.runs), len(group.runs)) for _ in resamples]
        for model in group.models():
            rows = [run.row(model) for run in group.runs]
            out[f"{group.label}:{model}"] = {
                sub.name: _pooled(sub, rows, baseline, fns, result, resamples, draws)
                for sub in result.submetrics
                if all(sub.name in result.estimates[r] for r in rows)
            }
            _pooled_length(out[f"{group.label}:{model}"], rows, table, result, baseline, resamples, draws)
    return out


def _pooled(
    sub: SubMetric,
    rows: list[str],
    baseline: str,
    fns: dict[tuple[str, str], ScoreFn],
    result: EvalResult,
    resamples: list[np.ndarray],
    draws: list[np.ndarray],
) -> dict[str, Any]:
    per_seed = np.array([result.estimates[r][sub.name].value for r in rows])
    entry: dict[str, Any] = {
        "seeds": len(rows),
        "mean": float(per_seed.mean()),
        "sd": float(per_seed.std(ddof=1)),
        "min": float(per_seed.min()),
        "max": float(per_seed.max()),
    }
    if not all((r, sub.name) in fns for r in rows):
        return entry
    every = np.arange(result.n_contexts)
    value = float(np.mean([fns[(r, sub.name)](every) for r in rows]))
    reps = np.array(
        [np.mean([fns[(rows[k], sub.name)](idx) for k in d]) for idx, d in zip(resamples, draws, strict=True)]
    )
    reps = _debiased(sub, value, reps)
    entry["pooled"] = _json(percentile_interval(value, reps, result.settings.ci_level))
    if (baseline, sub.name) in fns:
        base = fns[(baseline, sub.name)]
        base_value = base(every)
        base_reps = _debiased(sub, base_value, np.array([base(idx) for idx in resamples]))
        delta = value - base_value
        entry["pooled_difference"] = _json(percentile_interval(delta, reps - base_reps, result.settings.ci_level))
    return entry


def _debiased(sub: SubMetric, value: float, reps: np.ndarray) -> np.ndarray:
    """Replicates shifted by their bootstrap bias where the submetric asks for it (Distinct-n), as `evaluate` does
    for each model before differences are taken."""
    if not sub.bias_correct:
        return reps
    reps = reps - (np.nanmean(reps) - value)
    return np.clip(reps, 0.0, 1.0) if sub.percent else reps


def _pooled_length(
    entries: dict[str, dict[str, Any]],
    rows: list[str],
    table: ResponsesTable,
    result: EvalResult,
    baseline: str,
    resamples: list[np.ndarray],
    draws: list[np.ndarray],
) -> None:
    base = result.per_context.get(baseline, {})
    for name, entry in entries.items():
        if name not in base or name == "length" or not all(name in result.per_context[r] for r in rows):
            continue
        diffs = [result.per_context[r][name] - base[name] for r in rows]
        lengths = [reply_words(table, r) - reply_words(table, baseline) for r in rows]
        fit = intercept_interval(diffs, lengths, resamples, draws, result.settings.ci_level)
        if fit is not None:
            entry["length_controlled_difference"] = fit


def score_functions(
    table: ResponsesTable, result: EvalResult, config: ExperimentConfig
) -> dict[tuple[str, str], ScoreFn]:
    """(row, submetric) -> its value on a list of context indices: per-context metrics from the evaluation's
    values; corpus-level ones from the registered metrics run again on the table (the judge is not asked again)."""
    from esc_evolve.evaluation import EvaluationSettings
    from esc_evolve.evaluation.registry import get_metric
    from esc_evolve.evaluation.resources import EvalContext

    fns: dict[tuple[str, str], ScoreFn] = {}
    for row, values in result.per_context.items():
        for name, array in values.items():
            fns[(row, name)] = mean_fn(array)
    settings = EvaluationSettings.for_experiment(config)
    ctx = EvalContext(table, settings)
    for name in (m for m in settings.metrics if m != "judge"):
        try:
            output = get_metric(name)(ctx)
        except EscEvolveError:
            continue  # skipped in the evaluation too (its note says why)
        for row, scores in output.scores.items():
            for sub, fn in scores.corpus.items():
                fns[(row, sub)] = fn
    return fns


# ---------------------------------------------------------------------------------------------------------
# Per run: reflections, pairs, time


def _add_run_details(comparison: Comparison) -> None:
    from esc_evolve.pipeline.evaluation import iteration_reflections

    for run in comparison.runs:
        try:
            comparison.reflections[run.label] = iteration_reflections(run.layout, run.config)
        except EscEvolveError as exc:  # e.g. the run's training data is not reachable from here
            comparison.notes.append(f"reflection accuracy of {run.label} left out: {exc}")
        comparison.pairs[run.label] = pair_rows(run.layout)
        for model, timing in (read_json(run.layout.generation_time_file) or {}).items():
            if model in run.models:
                comparison.generation_time[run.row(model)] = timing


def pair_rows(layout: RunLayout) -> list[dict[str, Any]]:
    """Per iteration with pairs: `pair_statistics` and the DPO numbers stages.json holds."""
    from esc_evolve.evolve.loop import pair_statistics
    from esc_evolve.evolve.pairs import PairStore

    stages = read_json(layout.stages_file) or {}
    rows = []
    for t in layout.iterations():
        if not layout.pairs_file(t).is_file():
            continue
        dpo = stages.get(f"iter{t}.dpo", {})
        rows.append(
            {
                "iteration": t,
                **pair_statistics(PairStore(layout.pairs_file(t)).read()),
                "reflection_parse_rate": stages.get(f"iter{t}.pairs", {}).get("reflection_parse_rate"),
                "dpo_steps": dpo.get("steps"),
                "reward_accuracy_last": dpo.get("rewards_accuracies_last"),
                "reward_margin_last": dpo.get("rewards_margins_last"),
            }
        )
    return rows


def _json(iv: Interval) -> dict[str, float | None]:
    from esc_evolve.evaluation.report.metrics_json import interval_json

    return interval_json(iv)
