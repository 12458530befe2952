"""LLM judge: versioned prompts, message building, and robust parsing of what a judge answers.

A judge is any callable `judge(messages: list[dict]) -> str` (chat messages in, text out); the generation
engine supplies backends. Every call is recorded with its raw output and a parse status ("ok", "partial",
"failed", "error" when the callable raised); failures are counted in the report, never silently dropped.
A judge may also have a `batch(list_of_messages) -> list[str]` method (answers in order): then many prompts
are sent at once (`judge_calls`), which a local model batches and a server answers concurrently.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from esc_evolve.data import TurnSample

POINTWISE_PROMPT = "judge_pointwise_v1.md"
PAIRWISE_PROMPT = "judge_pairwise_v1.md"
DIMENSIONS = ("empathy", "personalisation", "helpfulness", "fluency", "safety")
_DIMENSION_ALIASES = {"personalization": "personalisation", "empathetic": "empathy", "helpful": "helpfulness"}

BATCH_CHUNK = 256  # prompts per batched judge call: bounds memory and keeps progress visible

Judge = Callable[[list[dict[str, str]]], str]


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
    text = resources.files("esc_evolve.evaluation").joinpath("prompts").joinpath(name).read_text(encoding="utf-8")
    _, _, rest = text.partition("<<<SYSTEM>>>")
    system, _, user = rest.partition("<<<USER>>>")
    return PromptTemplate(name, system.strip(), user.strip(), hashlib.sha256(text.encode()).hexdigest()[:16])


def render_context(sample: TurnSample) -> str:
    return "\n".join(f"{'Seeker' if t.speaker == 'seeker' else 'Supporter'}: {t.text}" for t in sample.context)


def render_background(sample: TurnSample) -> str:
    p = sample.profile
    parts = [f"emotion: {p.emotion_type or 'unknown'}", f"problem: {p.problem_type or 'unknown'}"]
    if p.situation:
        parts.append(f"situation: {p.situation}")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Parsing


@dataclass
class JudgeRecord:
    kind: str  # "pointwise" | "pairwise"
    sample_id: str
    models: list[str]  # [model] or [model shown as A, model shown as B]
    raw: str
    status: str  # ok | partial | failed | error
    parsed: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _json_objects(text: str) -> list[dict[str, Any]]:
    """Every parseable {...} object in the text, outermost first (judges wrap JSON in prose or code fences)."""
    found, depth, start = [], 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0 and start is not None:
                try:
                    obj = json.loads(text[start : i + 1])
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    found.append(obj)
    return found


def _score(value: Any) -> float | None:
    try:
        number = float(str(value).strip().split("/")[0])
    except ValueError:
        return None
    return number if 1 <= number <= 5 else None


def parse_pointwise(text: str) -> tuple[dict[str, float], str]:
    """Scores found for DIMENSIONS and a status: ok (all five), partial (some), failed (none).

    JSON objects are tried first; otherwise "dimension: 4" / "Dimension - 4/5" lines are read with a regex."""
    scores: dict[str, float] = {}
    for obj in _json_objects(text or ""):
        for key, value in obj.items():
            name = _DIMENSION_ALIASES.get(str(key).strip().lower(), str(key).strip().lower())
            if name in DIMENSIONS and name not in scores and (score := _score(value)) is not None:
                scores[name] = score
    for name in DIMENSIONS:
        if name in scores:
            continue
        spelled = "personali[sz]ation" if name == "personalisation" else name
        match = re.search(rf"(?i)\b{spelled}\b\W{{0,4}}([1-5](?:\.\d+)?)(?!\d)", text or "")
        if match:
            scores[name] = float(match.group(1))
    status = "ok" if len(scores) == len(DIMENSIONS) else "partial" if scores else "failed"
    return scores, status


_VERDICT_PATTERNS = (
    re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.I),
    re.compile(
        r"(?i)\b(?:winner|better(?: response)?|verdict|answer)\s*(?:is|:|=)?\s*[\"'*]*\s*(?:response\s+)?(A|B|tie)\b"
    ),
    re.compile(r"(?i)^\W*(?:response\s+)?(A|B|tie)\W*$"),
)


def parse_pairwise(text: str) -> tuple[str | None, str]:
    """('A' | 'B' | 'tie', 'ok') or (None, 'failed'). A JSON {"winner": ...} is tried first, then [[A]]-style
    verdicts, "winner: B" phrases, or an answer that is just the letter. Contradictory verdicts fail."""
    for obj in _json_objects(text or ""):
        for key, value in obj.items():
            if str(key).strip().lower() in {"winner", "better", "verdict", "choice"}:
                verdict = _verdict(str(value))
                if verdict:
                    return verdict, "ok"
    for pattern in _VERDICT_PATTERNS:
        verdicts = {_verdict(m) for m in pattern.findall((text or "").strip())}
        verdicts.discard(None)
        if len(verdicts) == 1:
            return verdicts.pop(), "ok"
        if len(verdicts) > 1:
            return None, "failed"
    return None, "failed"


def _verdict(value: str) -> str | None:
    key = value.strip().strip("\"'*[]().").lower()
    key = key.removeprefix("response ").strip()
    return {"a": "A", "b": "B", "tie": "tie", "c": "tie", "draw": "tie", "equal": "tie", "both": "tie"}.get(key)


# ---------------------------------------------------------------------------------------------------------
# Prompts and records: building a prompt and reading its answer are separate, so that a judge asked one prompt
# at a time and one asked many at once (`judge_calls`) give the same records.


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


# ---------------------------------------------------------------------------------------------------------
# Calling


def judge_calls(judge: Judge, calls: Sequence[JudgeCall], chunk_size: int | None = None) -> list[JudgeRecord]:
    """A record per call, in order. A judge with a `batch(list_of_messages) -> list[str]` method gets the prompts
    `chunk_size` (default `BATCH_CHUNK`) at a time; a plain callable gets them one by one, in order."""
    answers = ask_judge(judge, [c.messages for c in calls], chunk_size)
    return [call.record(raw, error) for call, (raw, error) in zip(calls, answers, strict=True)]


def ask_judge(
    judge: Judge, prompts: Sequence[list[dict[str, str]]], chunk_size: int | None = None
) -> list[tuple[str, str | None]]:
    """(answer, None) or ("", error) per prompt, in order.

    With a `batch` method, a chunk whose batched call raises (or answers a wrong number of texts) is split in
    halves and each half asked again, down to single prompts, which go through `judge(messages)`: every error is
    recorded against its own prompt, as when calling one by one, while the prompts that work stay batched."""
    batch = getattr(judge, "batch", None)
    if not callable(batch):
        return [_call(judge, messages) for messages in prompts]
    chunk_size = max(1, BATCH_CHUNK if chunk_size is None else chunk_size)
    answers: list[tuple[str, str | None]] = []
    for start in range(0, len(prompts), chunk_size):
        answers += _ask_batch(judge, batch, list(prompts[start : start + chunk_size]))
    return answers


def _ask_batch(
    judge: Judge, batch: Callable[[list[list[dict[str, str]]]], Sequence[str]], prompts: list[list[dict[str, str]]]
) -> list[tuple[str, str | None]]:
    if len(prompts) == 1:
        return [_call(judge, prompts[0])]
    try:
        texts = list(batch(prompts))
        if len(texts) != len(prompts):
            raise ValueError(f"the judge's batch answered {len(texts)} texts for {len(prompts)} prompts")
    except Exception:  # which prompt failed is unknown: halve until each error has its own prompt
        half = len(prompts) // 2
        return _ask_batch(judge, batch, prompts[:half]) + _ask_batch(judge, batch, prompts[half:])
    return [(text if isinstance(text, str) else str(text), None) for text in texts]


def _call(judge: Judge, messages: list[dict[str, str]]) -> tuple[str, str | None]:
    try:
        out = judge(messages)
    except Exception as exc:  # a backend may fail in many ways (timeouts, HTTP errors): record, count, go on
        return "", f"{type(exc).__name__}: {exc}"
    return (out if isinstance(out, str) else str(out)), None
