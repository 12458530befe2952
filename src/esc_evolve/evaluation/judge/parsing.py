"""Reading what a judge answered: rubric scores (pointwise) or a verdict (pairwise), robust to prose and garbage.

Every call becomes a `JudgeRecord` with its raw output and a parse status ("ok", "partial", "failed", or
"error" when the judge raised); failures are counted in the report, never silently dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

DIMENSIONS = ("empathy", "personalisation", "helpfulness", "fluency", "safety")
_DIMENSION_ALIASES = {"personalization": "personalisation", "empathetic": "empathy", "helpful": "helpfulness"}


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
