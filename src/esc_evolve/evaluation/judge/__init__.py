"""The LLM judge of evaluation: what a judge is (`Judge`), its backends (`build_judge` from `eval.judge`), its
versioned prompts, the parsing of its answers, and asking it many prompts at once (`judge_calls`).

A plain function `messages -> str` is a judge too, once wrapped in `CallableJudge` (`evaluate` does it).
"""

from esc_evolve.evaluation.judge.asking import BATCH_CHUNK, ask_judge, judge_calls
from esc_evolve.evaluation.judge.backends import (
    JUDGES,
    GeneratorJudge,
    JudgeBuilder,
    build_judge,
    judge_endpoint,
    register_judge,
)
from esc_evolve.evaluation.judge.base import CallableJudge, Judge, Messages
from esc_evolve.evaluation.judge.parsing import DIMENSIONS, JudgeRecord, parse_pairwise, parse_pointwise
from esc_evolve.evaluation.judge.prompts import (
    PAIRWISE_PROMPT,
    POINTWISE_PROMPT,
    JudgeCall,
    PromptTemplate,
    load_prompt,
    pairwise_call,
    pointwise_call,
    render_background,
    render_context,
)

__all__ = [
    "BATCH_CHUNK",
    "DIMENSIONS",
    "JUDGES",
    "PAIRWISE_PROMPT",
    "POINTWISE_PROMPT",
    "CallableJudge",
    "GeneratorJudge",
    "Judge",
    "JudgeBuilder",
    "JudgeCall",
    "JudgeRecord",
    "Messages",
    "PromptTemplate",
    "ask_judge",
    "build_judge",
    "judge_calls",
    "judge_endpoint",
    "load_prompt",
    "pairwise_call",
    "parse_pairwise",
    "parse_pointwise",
    "pointwise_call",
    "register_judge",
    "render_background",
    "render_context",
]
