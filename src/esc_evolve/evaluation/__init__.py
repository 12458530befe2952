"""Evaluation of generated emotional-support responses (issue 6): metrics, statistics, reports, human eval.

Typical use (the generation engine writes responses.jsonl; see docs/evaluation.md):

    table = read_responses("responses.jsonl")
    result = evaluate(table, EvaluationSettings(), judge=my_judge)   # judge: messages -> str, optional
    write_report(result, table, Path("out"))
"""

from esc_evolve.evaluation.evaluate import Difference, EvalResult, WinRate, evaluate
from esc_evolve.evaluation.registry import (
    MetricOutput,
    ModelScores,
    SubMetric,
    available_metrics,
    get_metric,
    register_metric,
)
from esc_evolve.evaluation.report import write_report
from esc_evolve.evaluation.resources import EvalContext, Judge
from esc_evolve.evaluation.responses import (
    HUMAN,
    Reflection,
    ResponseRow,
    ResponsesTable,
    build_table,
    read_responses,
    write_responses,
)
from esc_evolve.evaluation.settings import EvaluationSettings

__all__ = [
    "HUMAN",
    "Difference",
    "EvalContext",
    "EvalResult",
    "EvaluationSettings",
    "Judge",
    "MetricOutput",
    "ModelScores",
    "Reflection",
    "ResponseRow",
    "ResponsesTable",
    "SubMetric",
    "WinRate",
    "available_metrics",
    "build_table",
    "evaluate",
    "get_metric",
    "read_responses",
    "register_metric",
    "write_report",
    "write_responses",
]
