"""LLM-judge metrics: pointwise rubric scores (1-5) per model, the judge's unhelpful rate, and pairwise win rates.

Unhelpful (judge) = helpfulness <= `unhelpful_threshold` (default 2: "little help" or worse on the rubric).
Pairwise: each (A, B) pair is judged in both orders; per context, A's score is the mean over the orders that
parsed of 1 (A preferred), 0.5 (tie), 0 (B preferred). Contexts where neither order parsed are excluded and
counted. `position_consistency` = share of contexts whose two orders agree (a judge with position bias disagrees).
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from esc_evolve.evaluation.judge import (
    DIMENSIONS,
    PAIRWISE_PROMPT,
    POINTWISE_PROMPT,
    JudgeRecord,
    judge_calls,
    load_prompt,
    pairwise_call,
    pointwise_call,
)
from esc_evolve.evaluation.registry import MetricOutput, ModelScores, SubMetric, register_metric
from esc_evolve.evaluation.resources import EvalContext
from esc_evolve.evaluation.responses import HUMAN
from esc_evolve.storage import write_atomic

SUBMETRICS = [
    *(SubMetric(f"judge_{d}", f"LLM judge {d} (1-5)", digits=2) for d in DIMENSIONS),
    SubMetric("unhelpful_judge", "share the judge rates helpfulness <= threshold", False, True),
]


@register_metric("judge")
def judge_metric(ctx: EvalContext) -> MetricOutput:
    if ctx.judge is None:
        ctx.notes.append("LLM judge skipped: no judge backend given (set eval.judge.backend to local or openai).")
        return MetricOutput([], {})
    limit = ctx.settings.judge.max_contexts
    n = len(ctx.table) if limit is None else min(len(ctx.table), limit)
    pairs = judge_pairs(ctx.table.models, ctx.settings.judge.pairs)
    # Every prompt is built first and the judge asked for all of them at once (in chunks), in the order
    # one-by-one calls would take: each model's contexts, then each pair's contexts in both orders.
    table = ctx.table
    calls = [pointwise_call(table.samples[i], m, table.responses[m][i]) for m in table.models for i in range(n)]
    for a, b in pairs:
        for i in range(n):
            shown_a, shown_b = (a, table.responses[a][i]), (b, table.responses[b][i])
            calls += [
                pairwise_call(table.samples[i], shown_a, shown_b),
                pairwise_call(table.samples[i], shown_b, shown_a),
            ]
    records = judge_calls(ctx.judge, calls)
    scores = {model: _pointwise(ctx, records[k * n : (k + 1) * n]) for k, model in enumerate(table.models)}
    pairwise, consistency = {}, {}
    start = len(table.models) * n
    for k, (a, b) in enumerate(pairs):
        block = records[start + 2 * n * k : start + 2 * n * (k + 1)]
        pairwise[(a, b)], consistency[f"{a} vs {b}"] = _pairwise(ctx, block)
    if ctx.out_dir is not None:
        lines = [json.dumps(r.to_json(), ensure_ascii=False) for r in records]
        write_atomic(ctx.out_dir / "judge_records.jsonl", "\n".join(lines) + "\n")
    status = Counter((r.kind, r.status) for r in records)
    info = {
        "backend": ctx.judge.description,
        "judged_contexts": n,
        "prompts": {p: load_prompt(p).sha256 for p in (POINTWISE_PROMPT, PAIRWISE_PROMPT)},
        "calls": len(records),
        "status_counts": {f"{kind}:{st}": c for (kind, st), c in sorted(status.items())},
        "status_by_model": {m: _statuses(records, "pointwise", {m}) for m in ctx.table.models},
        "status_by_pair": {f"{a} vs {b}": _statuses(records, "pairwise", {a, b}) for a, b in pairs},
        "position_consistency": consistency,
        "unhelpful_threshold": ctx.settings.unhelpful_threshold,
    }
    _note_failures(ctx, records)
    return MetricOutput(SUBMETRICS, scores, info, pairwise)


def _statuses(records: list[JudgeRecord], kind: str, models: set[str]) -> dict[str, int]:
    """Parse status counts of one model's pointwise calls, or of one pair's pairwise calls (both orders)."""
    return dict(Counter(r.status for r in records if r.kind == kind and set(r.models) == models))


def _note_failures(ctx: EvalContext, records: list[JudgeRecord]) -> None:
    # Failures leave NaN scores that the means skip: say how many, so that a mean over few answers is visible.
    failed = sum(r.status == "failed" for r in records)
    errors = sum(r.status == "error" for r in records)
    if failed or errors:
        where = f" (raw outputs in {ctx.out_dir / 'judge_records.jsonl'})" if ctx.out_dir is not None else ""
        ctx.notes.append(
            f"LLM judge: of {len(records)} calls, {failed} gave an unparseable answer and {errors} raised; "
            f"their scores are missing, not guessed{where}."
        )


def judge_pairs(models: list[str], pairs: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    """Default: each generated model vs its predecessor, and the last vs the first (e.g. m2 vs m0 if present)."""
    if pairs is not None:
        unknown = {m for pair in pairs for m in pair} - set(models)
        if unknown:
            raise ValueError(f"eval.judge.pairs name unknown model(s): {', '.join(sorted(unknown))}")
        return [tuple(p) for p in pairs]
    generated = [m for m in models if m != HUMAN]
    chosen = [(generated[i], generated[i - 1]) for i in range(1, len(generated))]
    last, first = generated[-1] if generated else None, "m0" if "m0" in generated else (generated or [None])[0]
    if last and first and last != first and (last, first) not in chosen:
        chosen.append((last, first))
    return chosen


def _pointwise(ctx: EvalContext, records: list[JudgeRecord]) -> ModelScores:
    """One model's scores from its pointwise records (context i first)."""
    values = {f"judge_{d}": np.full(len(ctx.table), np.nan) for d in DIMENSIONS}
    for i, record in enumerate(records):
        for dim, score in record.parsed.items():
            values[f"judge_{dim}"][i] = score
    helpful = values["judge_helpfulness"]
    unhelpful = np.where(np.isnan(helpful), np.nan, (helpful <= ctx.settings.unhelpful_threshold).astype(float))
    return ModelScores(per_context={**values, "unhelpful_judge": unhelpful})


def _pairwise(ctx: EvalContext, records: list[JudgeRecord]) -> tuple[np.ndarray, float]:
    """A pair's per-context scores and position consistency from its records: per context, (A, B) then (B, A)."""
    scores = np.full(len(ctx.table), np.nan)
    agree, both = 0, 0
    for i in range(len(records) // 2):
        first, second = records[2 * i], records[2 * i + 1]
        s1 = {"A": 1.0, "B": 0.0, "tie": 0.5}.get(first.parsed.get("winner"))
        s2 = {"A": 0.0, "B": 1.0, "tie": 0.5}.get(second.parsed.get("winner"))
        got = [s for s in (s1, s2) if s is not None]
        if got:
            scores[i] = float(np.mean(got))
        if len(got) == 2:
            both += 1
            agree += s1 == s2
    return scores, (agree / both if both else float("nan"))
