"""Preference pairs: every sample, kept or dropped, with its provenance, in an append-only JSON-lines file.

`pairs.jsonl` is written one line per finished sample, flushed and fsynced, so a killed run loses at most the
samples in flight; on resume, samples whose id is already in the file are not generated again. A last line cut
by a kill (no newline) is not a finished sample: it is ignored when reading and removed before the next append,
by writing the file without it and renaming that into place, so a crash during the repair loses nothing. Any
other unreadable line is an error that names the file and line.
`preference.jsonl` holds the kept pairs in the standard conversational preference format
(`prompt` / `chosen` / `rejected` message lists) that trl and LLaMA-Factory read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from esc_evolve.errors import DataFormatError
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
    # Only when the rejected side came from another model (evolve.rejected_from): which, and M_t's own draft y,
    # the one it reflected on. Left out of the file when None, so that default runs write what they always did.
    rejected_model: str | None = None
    draft: str | None = None


OPTIONAL_FIELDS = ("rejected_model", "draft")


class PairStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def done_ids(self) -> set[str]:
        return {record.sample_id for record in self.read()}

    def read(self) -> Iterator[PairRecord]:
        if not self.path.exists():
            return
        # Bytes, decoded line by line: a kill may cut the last line inside a multi-byte character.
        with self.path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.endswith(b"\n"):  # a line cut by a kill mid-write is not a finished sample
                    yield self._parse(line, number)

    def _parse(self, line: bytes, number: int) -> PairRecord:
        try:
            return PairRecord.model_validate_json(line.decode("utf-8"))
        except (ValidationError, UnicodeDecodeError) as exc:
            problem = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) and exc.errors() else str(exc)
            raise DataFormatError(
                f"{self.path}:{number}: not a pair record ({problem}); delete that line to generate the sample again"
            ) from None

    def append(self, records: Iterable[PairRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                for record in records:
                    unset = {name for name in OPTIONAL_FIELDS if getattr(record, name) is None}
                    handle.write(record.model_dump_json(exclude=unset) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:  # a failed write() names no file (e.g. a full disk): say which
            exc.filename = exc.filename or str(self.path)
            raise

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
        """Cut a last line left without its newline by a kill: a new file without it replaces the old one."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            write_atomic(self.path, data[: data.rfind(b"\n") + 1])
