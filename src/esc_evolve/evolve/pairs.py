"""Preference pairs: every sample, kept or dropped, with its provenance, in an append-only JSON-lines file.

`pairs.jsonl` is written one line per finished sample, flushed and fsynced, so a killed run loses at most the
samples in flight; on resume, samples whose id is already in the file are not generated again. A last line cut
by a kill (no newline) is not a finished sample: it is ignored when reading and removed before the next append,
by writing the file without it and renaming that into place, so a crash during the repair loses nothing. Any
other unreadable line is an error that names the file and line.
`preference.jsonl` holds the kept pairs in the standard conversational preference format
(`prompt` / `chosen` / `rejected` message lists) that trl and LLaMA-Factory read.

Sharding: N workers (`esc-evolve pairs RUN -i K --shard k/N`) each take the contexts whose sample id hashes to
their shard (`shard_of`, stable across processes and machines) and append to their own
`pairs.shard-k-of-N.jsonl`; `merge_shards` writes every record into `pairs.jsonl` in the contexts' order, as one
worker would have. A record does not depend on which worker made it: every request that samples carries a seed
derived from the sample id (`sample_seed`), never from its position in a batch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from esc_evolve.errors import ConfigError, DataFormatError
from esc_evolve.storage import write_atomic

log = logging.getLogger(__name__)


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
    # What the role and reflection-use filters found (filters.PairDecision.checks); absent in older files.
    checks: dict[str, Any] | None = None


OPTIONAL_FIELDS = ("rejected_model", "draft", "checks")


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


# ----------------------------------------------------------------------------------------------------------
# Seeds and shards that depend on the sample, never on where it sits


def sample_seed(seed: int, sample_id: str) -> int:
    """The seed of a sample's sampled request: the same in any batch, chunk, shard or resumed run."""
    return (seed + zlib.crc32(sample_id.encode("utf-8"))) % 2**31


def shard_of(sample_id: str, num_shards: int) -> int:
    """The shard a sample belongs to (a stable hash: Python's `hash` of a str changes between processes)."""
    return zlib.crc32(sample_id.encode("utf-8")) % num_shards


def parse_shard(text: str) -> tuple[int, int]:
    """`k/N` (0 <= k < N) -> (k, N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise ConfigError(f"--shard {text!r}: expected k/N with 0 <= k < N, e.g. 0/4")
    return int(match.group(1)), int(match.group(2))


def select_shard(samples: Sequence[Any], shard: int, num_shards: int) -> list[Any]:
    """The samples of shard `shard` of `num_shards`, in their order."""
    return [s for s in samples if shard_of(s.sample_id, num_shards) == shard]


def shard_file(pairs_file: Path, shard: int, num_shards: int) -> Path:
    return pairs_file.with_name(f"{pairs_file.stem}.shard-{shard}-of-{num_shards}{pairs_file.suffix}")


def shard_lock_file(shard: Path) -> Path:
    """The lock its worker holds while it writes `shard` (a merge takes it too, so it never merges a shard that
    is still being written)."""
    return shard.with_name(f".{shard.name}.lock")


def shard_files(pairs_file: Path) -> list[Path]:
    """The shard files written beside `pairs_file`, whatever their shard count."""
    pattern = re.compile(re.escape(pairs_file.stem) + r"\.shard-\d+-of-\d+" + re.escape(pairs_file.suffix))
    return sorted(p for p in pairs_file.parent.glob(f"{pairs_file.stem}.shard-*") if pattern.fullmatch(p.name))


def merge_shards(pairs_file: Path, sample_ids: Sequence[str]) -> dict[str, int]:
    """Fold the shard files into `pairs_file`: one record per sample (the one already in `pairs_file` first), in
    the order of `sample_ids`, written atomically; then the shard files are removed. Samples no file holds yet
    stay missing (the caller generates them). Without shard files nothing is touched."""
    shards = shard_files(pairs_file)
    if not shards:
        return {"shards": 0, "merged": 0, "missing": len(set(sample_ids) - PairStore(pairs_file).done_ids())}
    lines: dict[str, str] = {}
    for file in [pairs_file, *shards]:
        for record in PairStore(file).read():
            unset = {name for name in OPTIONAL_FIELDS if getattr(record, name) is None}
            lines.setdefault(record.sample_id, record.model_dump_json(exclude=unset) + "\n")
    wanted = set(sample_ids)
    stray = sorted(set(lines) - wanted)
    if stray:
        log.warning(
            "%d records in %s's shards belong to no context of this iteration (ignored): %s",
            len(stray),
            pairs_file.name,
            ", ".join(stray[:5]),
        )
    write_atomic(pairs_file, "".join(lines[i] for i in sample_ids if i in lines))
    for file in shards:
        file.unlink()
    merged = sum(i in lines for i in sample_ids)
    log.info("merged %d shard files into %s: %d of %d contexts", len(shards), pairs_file, merged, len(sample_ids))
    return {"shards": len(shards), "merged": merged, "missing": len(wanted) - merged}
