"""Preference pairs: every sample, kept or dropped, with its provenance, in an append-only JSON-lines file.

`pairs.jsonl` is written one line per finished sample, flushed and fsynced, so a killed run loses at most the
sample in flight; on resume, samples whose id is already in the file are not generated again.
`preference.jsonl` holds the kept pairs in the standard conversational preference format
(`prompt` / `chosen` / `rejected` message lists) that trl and LLaMA-Factory read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from esc_evolve.storage import write_atomic


class PairRecord(BaseModel):
    """One context's trip through answer -> reflect -> refine -> filter."""

    model_config = ConfigDict(extra="forbid")

    sample_id: str
    iteration: int
    principles_version: int | str
    prompt: list[dict[str, str]]  # the DPO prompt: system + dialogue context, no reflection
    rejected: str  # y: M_t's direct answer
    rejected_finish: str | None
    reflection: dict[str, Any]  # raw text and parse of each field
    refine_system: str  # the system message y' was generated under
    chosen: str  # y': the refined answer
    chosen_finish: str | None
    keep: bool
    reasons: list[str]
    rejected_degenerate: str | None
    gold: dict[str, Any]  # the seeker's gold profile and the human reply, for analysis only


class PairStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def done_ids(self) -> set[str]:
        return {record.sample_id for record in self.read()}

    def read(self) -> Iterator[PairRecord]:
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.endswith("\n"):  # a line cut by a kill mid-write is not a finished sample
                    yield PairRecord.model_validate_json(line)

    def append(self, records: Iterable[PairRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        with self.path.open("a", encoding="utf-8") as handle:
            for record in records:
                handle.write(record.model_dump_json() + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def export_preference(self, out: Path) -> int:
        """Write the kept pairs as prompt/chosen/rejected conversations; return how many."""
        rows = [
            {
                "prompt": r.prompt,
                "chosen": [{"role": "assistant", "content": r.chosen}],
                "rejected": [{"role": "assistant", "content": r.rejected}],
                "sample_id": r.sample_id,
            }
            for r in self.read()
            if r.keep
        ]
        write_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        return len(rows)

    def _drop_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            self.path.write_bytes(data[: data.rfind(b"\n") + 1])
