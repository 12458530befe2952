"""The input contract of evaluation: a table of responses, one per (turn-level context, model).

File format `responses.jsonl`, one JSON object a line, one line per (sample_id, model):

    {"sample_id": "valid.jsonl:3#5", "model": "m1", "response": "...",
     "reflection": {"emotion": "anxiety", "problem": "job crisis", "situation": "...", "text": "..."} | null,
     "sample": {...TurnSample fields...} | null, "meta": {...}}

`sample` (a serialised `TurnSample`: context, human reference, gold strategy, gold profile) must appear on at
least one line per sample_id, unless the table is read with `samples=` (e.g. rebuilt from the data split). The
human reference is available as the pseudo-model `human` (its response is `TurnSample.response`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from esc_evolve.data import TurnSample
from esc_evolve.errors import DataFormatError
from esc_evolve.storage import write_atomic

log = logging.getLogger(__name__)

HUMAN = "human"


class Reflection(BaseModel):
    """What a model said it inferred about the seeker before answering (all fields optional)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    emotion: str | None = None
    problem: str | None = None
    situation: str | None = None
    text: str | None = None


class ResponseRow(BaseModel):
    """One line of responses.jsonl."""

    model_config = ConfigDict(frozen=True)

    sample_id: str
    model: str
    response: str
    reflection: Reflection | None = None
    sample: TurnSample | None = None
    meta: dict[str, Any] = {}


@dataclass
class ResponsesTable:
    """Responses aligned by context: `responses[model][i]` answers `samples[i]` for every model."""

    samples: list[TurnSample]
    models: list[str]
    responses: dict[str, list[str]]
    reflections: dict[str, list[Reflection | None]]
    dropped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for model in self.models:
            if len(self.responses[model]) != len(self.samples):
                raise ValueError(f"model {model}: {len(self.responses[model])} responses for {len(self.samples)}")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def sample_ids(self) -> list[str]:
        return [s.sample_id for s in self.samples]

    @property
    def references(self) -> list[str]:
        return [s.response for s in self.samples]

    def conversation_groups(self) -> list[int]:
        """Index of each context's conversation, for the conversation-level (cluster) bootstrap."""
        ids: dict[str, int] = {}
        return [ids.setdefault(s.conversation_id, len(ids)) for s in self.samples]

    def has_reflections(self, model: str) -> bool:
        return any(r is not None for r in self.reflections.get(model, []))


def build_table(
    rows: Iterable[ResponseRow],
    samples: dict[str, TurnSample] | None = None,
    include_human: bool = True,
    models: list[str] | None = None,
) -> ResponsesTable:
    """Align rows into a table. Contexts that some model lacks are dropped (and counted): comparisons are paired."""
    rows = list(rows)
    known = dict(samples or {})
    for row in rows:
        if row.sample is not None:
            known.setdefault(row.sample_id, row.sample)
    by_model: dict[str, dict[str, ResponseRow]] = {}
    for row in rows:
        if row.sample_id in by_model.setdefault(row.model, {}):
            raise DataFormatError(f"duplicate row for sample {row.sample_id!r} and model {row.model!r}")
        by_model[row.model][row.sample_id] = row
    order = models or list(by_model)
    missing = [m for m in order if m not in by_model and m != HUMAN]
    if missing:
        raise DataFormatError(f"no responses for model(s) {', '.join(missing)} (have: {', '.join(by_model)})")
    order = [m for m in order if m != HUMAN]
    sample_ids = list(dict.fromkeys(r.sample_id for r in rows))
    unknown = [s for s in sample_ids if s not in known]
    if unknown:
        raise DataFormatError(
            f"{len(unknown)} sample_id(s) have no 'sample' on any line and none was given (first: {unknown[0]!r}); "
            "pass the data split the responses were generated from"
        )
    kept = [s for s in sample_ids if all(s in by_model[m] for m in order)]
    dropped = {m: sum(1 for s in sample_ids if s not in by_model[m]) for m in order}
    if len(kept) < len(sample_ids):
        log.warning("dropped %d context(s) that not every model answered: %s", len(sample_ids) - len(kept), dropped)
    if not kept:
        raise DataFormatError("no context has a response from every model")
    table_samples = [known[s] for s in kept]
    responses = {m: [by_model[m][s].response for s in kept] for m in order}
    reflections = {m: [by_model[m][s].reflection for s in kept] for m in order}
    if include_human:
        order = [*order, HUMAN]
        responses[HUMAN] = [s.response for s in table_samples]
        reflections[HUMAN] = [None] * len(kept)
    return ResponsesTable(table_samples, order, responses, reflections, {k: v for k, v in dropped.items() if v})


def read_rows(path: str | Path) -> list[ResponseRow]:
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such responses file")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(ResponseRow.model_validate(json.loads(line)))
            except (json.JSONDecodeError, ValidationError) as exc:
                first = str(exc).splitlines()[0]
                raise DataFormatError(f"{path}:{line_no}: not a valid response row: {first}") from None
    if not rows:
        raise DataFormatError(f"{path}: no rows")
    return rows


def read_responses(
    path: str | Path,
    samples: dict[str, TurnSample] | None = None,
    include_human: bool = True,
    models: list[str] | None = None,
) -> ResponsesTable:
    return build_table(read_rows(path), samples=samples, include_human=include_human, models=models)


def write_responses(path: str | Path, rows: Iterable[ResponseRow], with_samples: bool = True) -> None:
    """Write rows atomically; with_samples keeps each context's `sample` on its first line only (smaller file)."""
    seen: set[str] = set()
    lines = []
    for row in rows:
        keep = with_samples and row.sample is not None and row.sample_id not in seen
        seen.add(row.sample_id)
        data = row.model_dump(mode="json")
        if not keep:
            data.pop("sample", None)
        if data.get("reflection") is None:
            data.pop("reflection", None)
        lines.append(json.dumps(data, ensure_ascii=False))
    write_atomic(Path(path), "\n".join(lines) + "\n")


def samples_by_id(samples: Iterable[TurnSample]) -> dict[str, TurnSample]:
    return {s.sample_id: s for s in samples}
