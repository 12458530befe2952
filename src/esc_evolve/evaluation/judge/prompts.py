"""Judge prompts: the versioned prompt files shipped in `evaluation/prompts/`, filled for one context.

Building a prompt (`JudgeCall`) and reading its answer (`JudgeCall.record`) are separate, so that a judge asked
one prompt at a time and one asked many at once give the same records.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from esc_evolve.data import TurnSample
from esc_evolve.evaluation.judge.parsing import JudgeRecord, parse_pairwise, parse_pointwise

POINTWISE_PROMPT = "judge_pointwise_v1.md"
PAIRWISE_PROMPT = "judge_pairwise_v1.md"


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    system: str
    user: str
    sha256: str

    def messages(self, **fields: str) -> list[dict[str, str]]:
        user = self.user
        for key, value in fields.items():
            user = user.replace("{{" + key + "}}", value)
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


@cache
def load_prompt(name: str) -> PromptTemplate:
    """A prompt file of the package; its sha256 goes into metrics.json (a change of wording is a new file)."""
    text = resources.files("esc_evolve.evaluation").joinpath("prompts").joinpath(name).read_text(encoding="utf-8")
    _, _, rest = text.partition("<<<SYSTEM>>>")
    system, _, user = rest.partition("<<<USER>>>")
    return PromptTemplate(name, system.strip(), user.strip(), hashlib.sha256(text.encode()).hexdigest()[:16])


def render_context(sample: TurnSample) -> str:
    return "\n".join(f"{'Seeker' if t.speaker == 'seeker' else 'Supporter'}: {t.text}" for t in sample.context)


def render_background(sample: TurnSample) -> str:
    """The gold profile, shown to the judge as background hidden from the supporter."""
    p = sample.profile
    parts = [f"emotion: {p.emotion_type or 'unknown'}", f"problem: {p.problem_type or 'unknown'}"]
    if p.situation:
        parts.append(f"situation: {p.situation}")
    return "\n".join(parts)


@dataclass(frozen=True)
class JudgeCall:
    """One prompt for the judge and what its record will say: kind, context and models (as shown)."""

    kind: str  # "pointwise" | "pairwise"
    sample_id: str
    models: list[str]
    messages: list[dict[str, str]]

    def record(self, raw: str, error: str | None = None) -> JudgeRecord:
        """The judge's answer (or the error its call raised) parsed into a record."""
        if error is not None:
            return JudgeRecord(self.kind, self.sample_id, list(self.models), raw, "error", error=error)
        if self.kind == "pointwise":
            scores, status = parse_pointwise(raw)
            return JudgeRecord(self.kind, self.sample_id, list(self.models), raw, status, parsed=scores)
        verdict, status = parse_pairwise(raw)
        parsed = {"winner": verdict} if verdict else {}
        return JudgeRecord(self.kind, self.sample_id, list(self.models), raw, status, parsed=parsed)


def pointwise_call(sample: TurnSample, model: str, response: str) -> JudgeCall:
    prompt = load_prompt(POINTWISE_PROMPT)
    messages = prompt.messages(background=render_background(sample), context=render_context(sample), response=response)
    return JudgeCall("pointwise", sample.sample_id, [model], messages)


def pairwise_call(sample: TurnSample, shown_a: tuple[str, str], shown_b: tuple[str, str]) -> JudgeCall:
    """One order; shown_a / shown_b are (model, response)."""
    prompt = load_prompt(PAIRWISE_PROMPT)
    messages = prompt.messages(
        background=render_background(sample),
        context=render_context(sample),
        response_a=shown_a[1],
        response_b=shown_b[1],
    )
    return JudgeCall("pairwise", sample.sample_id, [shown_a[0], shown_b[0]], messages)
