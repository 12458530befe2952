"""Evaluation of generated emotional-support responses. It scores responses; generating them is the pipeline's.

- the scoring core: `responses.py` (the input table), `evaluate.py` (metrics + paired bootstrap CIs), `registry.py`
  (metrics by name), `resources.py` (shared embedder/classifier), `settings.py`, `stats.py`;
- `metrics/`: each metric, registered by name (with `embedding.py`, `strategy.py`, `matching.py` they use);
- `judge/`: the LLM judge as a class built from `eval.judge`; `report/`: metrics.json, report.md/html, plots;
- `human.py`: blinded A/B sheets for human raters and their agreement.

Typical use (the generation engine writes responses.jsonl; see docs/evaluation.md):

    table = read_responses("responses.jsonl")
    result = evaluate(table, EvaluationSettings(), judge=my_judge)   # a Judge, or messages -> str; optional
    write_report(result, table, Path("out"))

The judge a config names: `build_judge(config.eval.judge, config.model, config.generation, seed=config.run.seed)`.
"""

from esc_evolve.evaluation.evaluate import Difference, EvalResult, WinRate, evaluate
from esc_evolve.evaluation.judge import CallableJudge, Judge, build_judge, register_judge
from esc_evolve.evaluation.registry import (
    MetricOutput,
    ModelScores,
    SubMetric,
    available_metrics,
    get_metric,
    register_metric,
)
from esc_evolve.evaluation.report import write_report
from esc_evolve.evaluation.resources import EvalContext
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
    "CallableJudge",
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
    "build_judge",
    "build_table",
    "evaluate",
    "get_metric",
    "read_responses",
    "register_judge",
    "register_metric",
    "write_report",
    "write_responses",
]
